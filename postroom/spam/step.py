"""The incoming pipeline's spam step: per-recipient folder choice from the filter's verdict."""

from __future__ import annotations

import asyncio
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
        await self.filter.record_verdict(*await self._decide(message))

    async def run_batch(self, messages: list[IncomingMessage]) -> list[BaseException | None]:
        """Each message decided as `run` does; the sender votes of those decided recorded
        together. A message whose decision or vote failed is retried later, as with `run`."""
        outcomes = await asyncio.gather(*(self._decide(m) for m in messages),
                                        return_exceptions=True)
        errors: list[BaseException | None] = [
            o if isinstance(o, BaseException) else None for o in outcomes]
        verdicts = [o for o in outcomes if not isinstance(o, BaseException)]
        try:
            await self.filter.record_verdicts(verdicts)
        except Exception as exc:
            errors = [e if e is not None else exc for e in errors]
        return errors

    async def _decide(self, message: IncomingMessage) -> tuple[Analysis, bool]:
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
        log.info("incoming item %s: spam score %.2f (%s)", message.item.item_id, analysis.score,
                 ", ".join(analysis.reasons[:6]))
        return analysis, junk_any
