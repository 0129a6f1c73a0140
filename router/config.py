"""The router's settings: frozen, validated at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from router.slo import DEFAULT_CLASS, DEFAULT_SLO_CLASSES, SloClass

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MIN_API_KEY_CHARS = 16


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (None: it can). The reason never quotes the key."""
    if len(key) < MIN_API_KEY_CHARS:
        return f"must be at least {MIN_API_KEY_CHARS} characters"
    if not all("!" <= c <= "~" for c in key):
        return "must be printable ASCII without spaces"
    return None


class RouterConfigError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class RouterConfig:
    """`max_model_len` / `vocab_size` bound requests (vocab_size None: the tokenizer's size).

    `max_inflight_prefills` bounds requests between placement and first token; more wait in
    the EDF router queue, at most `max_queue` of them. `kv_salt` must equal the engine's
    block-hash salt for the router's prefix-hit estimate to match the workers' caches.
    """

    max_model_len: int
    model_name: str = "unnamed"
    vocab_size: int | None = None
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the server reports the bound one)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    enable_reflection: bool = False
    heartbeat_interval_s: float = 0.5
    # A heartbeat late by this much marks the worker down and fails its requests: generous, since
    # a busy CPU host (two cores, torch in every worker) can delay a live worker's answer past
    # a second; a dead actor is noticed at once anyway (its calls raise).
    heartbeat_timeout_s: float = 5.0
    poll_wait_s: float = 1.0
    poll_grace_s: float = 1.0
    max_inflight_prefills: int = 1024
    max_queue: int = 4096
    starvation_s: float = 5.0
    # Start the decode worker on a prompt's KV as soon as the prefill worker hands out its
    # handle (the KV streams while the prefill computes), not once the first token is out.
    stream_kv: bool = True
    slo_classes: Mapping[str, SloClass] = field(default_factory=lambda: dict(DEFAULT_SLO_CLASSES))
    kv_salt: str = ""
    metrics_targets: tuple[str, ...] = ()
    metrics_host: str | None = None  # None: `host`
    metrics_port: int | None = None  # None: metrics not served; 0: any free port
    # The OpenAI-compatible HTTP API (router/http/) on `host`; None: not served; 0: any free port
    http_port: int | None = None
    # TLS on the client port: cert and key (PEM files) turn it on; a client CA requires clients
    # to present a certificate it signed (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Every call but health needs `authorization: Bearer <api_key>` (router.auth); None: no auth.
    # Never printed: left out of the repr, and no error message quotes it.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (self.max_model_len >= 2, "max_model_len", "must be >= 2"),
            (self.vocab_size is None or self.vocab_size >= 1, "vocab_size", "must be >= 1"),
            (0 <= self.port < 65536, "port", "must be in [0, 65536)"),
            (self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024"),
            (self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0"),
            (self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0"),
            (
                self.poll_wait_s > 0 and self.poll_grace_s > 0,
                "poll_wait_s",
                "poll wait and grace must be > 0",
            ),
            (self.max_inflight_prefills >= 1, "max_inflight_prefills", "must be >= 1"),
            (self.max_queue >= 0, "max_queue", "must be >= 0"),
            (self.starvation_s > 0, "starvation_s", "must be > 0"),
            (
                self.metrics_port is None or 0 <= self.metrics_port < 65536,
                "metrics_port",
                "must be in [0, 65536)",
            ),
            (
                self.http_port is None or 0 <= self.http_port < 65536,
                "http_port",
                "must be in [0, 65536)",
            ),
            (DEFAULT_CLASS in self.slo_classes, "slo_classes", f"must define {DEFAULT_CLASS!r}"),
            (
                (self.tls_cert_file is None) == (self.tls_key_file is None),
                "tls_key_file",
                "tls_cert_file and tls_key_file go together",
            ),
            (
                self.tls_client_ca_file is None or self.tls_cert_file is not None,
                "tls_client_ca_file",
                "needs tls_cert_file and tls_key_file",
            ),
        ]
        for ok, name, message in checks:
            if not ok:
                raise RouterConfigError(name, message)
        if self.api_key is not None and (problem := api_key_problem(self.api_key)) is not None:
            raise RouterConfigError("api_key", problem)
