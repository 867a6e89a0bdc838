"""Builds the spam filter from the settings (called by the app)."""

from __future__ import annotations

from pathlib import Path

from postroom.analysis import AnalysisPool
from postroom.config import Settings
from postroom.spam.auth import Authenticator, make_sync_resolver
from postroom.spam.classifier import ContentClassifier
from postroom.spam.dnsbl import make_async_resolver
from postroom.spam.filter import FilterSettings, SpamFilter
from postroom.spam.pool import ScoringPool
from postroom.store.blobs import BlobStore
from postroom.store.metadata import MetadataStore


def model_path(settings: Settings) -> Path | None:
    """The configured model, else the one `postroom spam train` left in the data dir, else
    None (the shipped default)."""
    if settings.spam.model:
        return Path(settings.spam.model)
    trained = settings.data_dir / "spam-model.npz"
    return trained if trained.is_file() else None


def make_spam_filter(settings: Settings, metadata: MetadataStore, blobs: BlobStore,
                     analysis: AnalysisPool | None = None) -> SpamFilter:
    s = settings.spam
    servers, timeout = list(settings.dns.servers), settings.dns.timeout
    model = model_path(settings)
    classifier = ContentClassifier.from_file(model)
    return SpamFilter(
        metadata=metadata,
        blobs=blobs,
        classifier=classifier,
        scoring=ScoringPool(analysis, model) if analysis is not None else None,
        authenticator=Authenticator(make_sync_resolver(servers, timeout))
        if s.check_auth else None,
        resolver=make_async_resolver(servers, timeout) if s.dnsbl else None,
        hostname=settings.hostname,
        settings=FilterSettings(
            junk_threshold=s.junk_threshold, reject_threshold=s.reject_threshold,
            dmarc_reject=s.dmarc_reject, dnsbl_zones=tuple(s.dnsbl), check_auth=s.check_auth,
            reputation_half_life=s.reputation_half_life,
            trusted_networks=tuple(s.trusted_networks),
            messages_per_hour=s.messages_per_hour, recipients_per_day=s.recipients_per_day,
            hold_score=s.hold_score, burst_messages=s.burst_messages,
            burst_minutes=s.burst_minutes),
    )
