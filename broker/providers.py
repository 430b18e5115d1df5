"""Known API providers: which environment variables their SDKs read, and where they call.

Data, not code paths: `outloop run` points each known provider's base-URL variable
at the broker and sets its key variable to the session token, never to a key. A
credential is matched to a provider by the host of its base URL, or else by its
name (a credential called "openai" pointing at a test server is still OpenAI's).

`sdk_base` is the base URL the SDK uses by default; the variable's value is the
broker's proxy root for the credential plus whatever part of that path the
credential's own base URL does not already hold (OpenAI's SDK expects `/v1` in
its base URL; a credential whose base URL ends in `/v1` needs nothing more).

A provider whose usual tools ignore a base-URL variable (GitHub's `gh` sends
GITHUB_TOKEN to api.github.com whatever GITHUB_API_URL says) gets no key
variable: the token would go to the provider itself. Its calls are identified
by their process tree instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Provider:
    """One API provider as its SDKs see it."""

    name: str
    hosts: tuple[str, ...]  # hosts of the provider's API, as in a credential's base_url
    sdk_base: str  # the SDK's default base URL
    base_url_env: tuple[str, ...]  # variables naming the base URL
    key_env: tuple[str, ...] = ()  # variables holding the API key (set to the session token)


PROVIDERS: tuple[Provider, ...] = (
    Provider("openai", ("api.openai.com",), "https://api.openai.com/v1", ("OPENAI_BASE_URL",), ("OPENAI_API_KEY",)),
    Provider(
        "anthropic",
        ("api.anthropic.com",),
        "https://api.anthropic.com",
        ("ANTHROPIC_BASE_URL",),
        ("ANTHROPIC_API_KEY",),
    ),
    Provider("mistral", ("api.mistral.ai",), "https://api.mistral.ai/v1", ("MISTRAL_BASE_URL",), ("MISTRAL_API_KEY",)),
    Provider("groq", ("api.groq.com",), "https://api.groq.com/openai/v1", ("GROQ_BASE_URL",), ("GROQ_API_KEY",)),
    Provider(
        "openrouter",
        ("openrouter.ai",),
        "https://openrouter.ai/api/v1",
        ("OPENROUTER_BASE_URL",),
        ("OPENROUTER_API_KEY",),
    ),
    Provider("github", ("api.github.com",), "https://api.github.com", ("GITHUB_API_URL",)),
)

# Every key variable of the catalog: `outloop run` clears those it does not set, so a
# real key in the operator's own environment never reaches the agent.
KEY_VARIABLES: frozenset[str] = frozenset(v for p in PROVIDERS for v in p.key_env)


def provider_for(credential_name: str, base_url: str) -> Provider | None:
    """The provider of a credential: by its base URL's host, else by its name."""
    host = (urlsplit(base_url).hostname or "").lower()
    for provider in PROVIDERS:
        if host in provider.hosts:
            return provider
    for provider in PROVIDERS:
        if credential_name.lower() == provider.name:
            return provider
    return None


def sdk_suffix(provider: Provider, base_url: str) -> str:
    """What the SDK's default base path adds to the credential's base path ('' or '/v1', ...)."""
    sdk_path = urlsplit(provider.sdk_base).path.rstrip("/")
    own_path = urlsplit(base_url).path.rstrip("/")
    if own_path and sdk_path.startswith(own_path):
        return sdk_path[len(own_path) :]
    if own_path:  # the credential already names a deeper (or different) path: use it as is
        return ""
    return sdk_path


def session_env(credentials: list[tuple[str, str]], broker_url: str | None, token: str) -> dict[str, str]:
    """Provider variables for a session: `credentials` are (name, base_url) pairs, sorted.

    Without `broker_url` (no loopback listener) there is nothing an SDK could reach,
    and no variable is set. The first credential of a provider wins.
    """
    env: dict[str, str] = {}
    if broker_url is None:
        return env
    seen: set[str] = set()
    # A credential matched by host wins over one matched by name only.
    ranked = sorted(
        credentials,
        key=lambda c: (0 if (urlsplit(c[1]).hostname or "") in {h for p in PROVIDERS for h in p.hosts} else 1, c[0]),
    )
    for name, base_url in ranked:
        provider = provider_for(name, base_url)
        if provider is None or provider.name in seen:
            continue
        seen.add(provider.name)
        url = f"{broker_url}/v1/proxy/{name}{sdk_suffix(provider, base_url)}"
        for var in provider.base_url_env:
            env[var] = url
        for var in provider.key_env:
            env[var] = token
    return env
