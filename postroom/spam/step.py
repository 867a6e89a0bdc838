"""The incoming pipeline's spam step: per-recipient folder choice from the filter's verdict."""

from __future__ import annotations

import json
import logging

from postroom.core.models import FolderRole
from postroom.mailflow.incoming import IncomingMessage
from postroom.service import MailService
from postroom.spam.filter import Analysis, SpamFilter

log = logging.getLogger(__name__)


class SpamCheck:
    """Reads the SMTP-time analysis from the queue item (or analyses now, for mail queued
    without one), then asks the filter for each recipient: INBOX or Junk."""

    name = "spam"

    def __init__(self, service: MailService, spam_filter: SpamFilter) -> None:
        self.service = service
        self.filter = spam_filter

    async def run(self, message: IncomingMessage) -> None:
        data = json.loads(message.item.payload).get("screening")
        if data:
            analysis = Analysis.from_json(data)
        else:
            analysis = await self.filter.analyse(message.envelope, message.raw)
            message.raw = self.filter.headers(analysis) + message.raw
        junk_any = False
        for rcpt in message.envelope.rcpt_to:
            user = await self.service.resolve_recipient(rcpt)
            if user is None or user.user_id in message.folders:
                continue
            decision = await self.filter.decide(analysis, message.envelope, message.raw, user)
            if decision.junk:
                message.folders[user.user_id] = FolderRole.JUNK
                junk_any = True
            message.verdicts[user.user_id] = (
                f"{'junk' if decision.junk else 'inbox'} {decision.score:.2f} "
                + " ".join(decision.reasons)).strip()
        await self.filter.record_verdict(analysis, junk_any)
        log.info("incoming item %s: spam score %.2f (%s)", message.item.item_id, analysis.score,
                 ", ".join(analysis.reasons[:6]))
