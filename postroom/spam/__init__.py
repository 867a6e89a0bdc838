"""Keeping spam out: sender authentication (SPF, DKIM, ARC, DMARC), DNS blocklists, the content
classifier, sender reputation, feedback, block/allow lists and outbound abuse limits."""
