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

The catalog also says what a new credential of the provider starts with (base
URL, auth, read-only `allow`, `ask` for the rest) and how its keys are found in
a `.env` file (the leak rules that recognise them, the variables that hold
them): `outloop credential add --provider` and `outloop import` read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Provider:
    """One API provider as its SDKs see it, and what a new credential for it starts with.

    `base_url` and `auth` may name another variable of the same `.env` file in braces
    (Supabase's project URL, Twilio's account SID): `outloop import` fills them from
    the file, and `outloop credential add --provider` asks for `--base-url` instead.
    `allow` is the read-only part of the API; `ask` is everything else.
    """

    name: str
    title: str
    base_url: str  # a new credential's base_url
    auth: str = "bearer"  # a new credential's auth (bearer | basic:<user> | header:<Name> | query:<param>)
    rules: tuple[str, ...] = ()  # leak rule ids (broker/leaks/rules.py) that recognise its keys
    key_names: tuple[str, ...] = ()  # variables that hold its key in .env files and SDK docs
    hosts: tuple[str, ...] = ()  # hosts of the provider's API, as in a credential's base_url
    sdk_base: str = ""  # the SDK's default base URL (for the base-URL variable's path)
    base_url_env: tuple[str, ...] = ()  # variables an SDK reads its base URL from
    key_env: tuple[str, ...] = ()  # variables `outloop run` sets to the session token
    allow: tuple[str, ...] = ("GET /**",)
    ask: tuple[str, ...] = ("* /**",)


def _p(
    name: str,
    title: str,
    base_url: str,
    *,
    auth: str = "bearer",
    rules: tuple[str, ...] = (),
    keys: tuple[str, ...] = (),
    base_env: tuple[str, ...] = (),
    key_env: tuple[str, ...] = (),
    sdk_base: str = "",
    allow: tuple[str, ...] = ("GET /**",),
    ask: tuple[str, ...] = ("* /**",),
) -> Provider:
    host = urlsplit(base_url).hostname
    return Provider(
        name=name,
        title=title,
        base_url=base_url,
        auth=auth,
        rules=rules,
        key_names=tuple(dict.fromkeys((*key_env, *keys))),
        hosts=(host,) if host and "{" not in base_url else (),
        sdk_base=sdk_base or base_url,
        base_url_env=base_env,
        key_env=key_env,
        allow=allow,
        ask=ask,
    )


_MODELS = ("GET /models", "GET /models/*")  # an LLM API's read-only part: listing models

# Only providers whose SDKs read a base-URL variable get `key_env` (set to the session
# token by `outloop run`); for the others the token would go to the provider itself.
PROVIDERS: tuple[Provider, ...] = (
    _p(
        "openai",
        "OpenAI",
        "https://api.openai.com/v1",
        rules=(
            "openai-project-key",
            "openai-service-account-key",
            "openai-admin-key",
            "openai-legacy-key",
            "openai-legacy-key-48",
        ),
        base_env=("OPENAI_BASE_URL",),
        key_env=("OPENAI_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "anthropic",
        "Anthropic",
        "https://api.anthropic.com",
        auth="header:x-api-key",
        rules=("anthropic-api-key", "anthropic-admin-key"),
        base_env=("ANTHROPIC_BASE_URL",),
        key_env=("ANTHROPIC_API_KEY",),
        keys=("CLAUDE_API_KEY",),
        allow=("GET /v1/models", "GET /v1/models/*"),
    ),
    _p(
        "mistral",
        "Mistral",
        "https://api.mistral.ai/v1",
        rules=("mistral-api-key",),
        base_env=("MISTRAL_BASE_URL",),
        key_env=("MISTRAL_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "groq",
        "Groq",
        "https://api.groq.com/openai/v1",
        rules=("groq-api-key",),
        base_env=("GROQ_BASE_URL",),
        key_env=("GROQ_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "openrouter",
        "OpenRouter",
        "https://openrouter.ai/api/v1",
        rules=("openrouter-api-key",),
        base_env=("OPENROUTER_BASE_URL",),
        key_env=("OPENROUTER_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "cohere",
        "Cohere",
        "https://api.cohere.com",
        rules=("cohere-api-key",),
        base_env=("CO_API_URL",),
        key_env=("CO_API_KEY",),
        keys=("COHERE_API_KEY",),
        allow=("GET /v1/models", "GET /v1/models/*"),
    ),
    _p(
        "huggingface",
        "Hugging Face",
        "https://huggingface.co",
        rules=("huggingface-token", "huggingface-org-token"),
        base_env=("HF_ENDPOINT",),
        key_env=("HF_TOKEN",),
        keys=("HUGGINGFACE_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACEHUB_API_TOKEN", "HF_API_TOKEN"),
    ),
    _p(
        "google-ai",
        "Google AI (Gemini)",
        "https://generativelanguage.googleapis.com",
        auth="header:x-goog-api-key",
        # gcp-api-key (AIza…) is any Google API key (Maps too): known by its variable only.
        keys=("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENERATIVE_AI_API_KEY", "GOOGLE_AI_API_KEY"),
        allow=("GET /v1beta/models", "GET /v1beta/models/*", "GET /v1/models", "GET /v1/models/*"),
    ),
    _p("xai", "xAI", "https://api.x.ai/v1", rules=("xai-api-key",), keys=("XAI_API_KEY",), allow=_MODELS),
    _p(
        "deepseek",
        "DeepSeek",
        "https://api.deepseek.com",
        rules=("deepseek-api-key",),
        keys=("DEEPSEEK_API_KEY",),
        allow=("GET /models",),
    ),
    _p(
        "together",
        "Together AI",
        "https://api.together.xyz/v1",
        rules=("together-api-key", "together-api-key-legacy"),
        keys=("TOGETHER_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "perplexity",
        "Perplexity",
        "https://api.perplexity.ai",
        rules=("perplexity-api-key",),
        keys=("PERPLEXITY_API_KEY", "PPLX_API_KEY"),
        allow=(),
    ),
    _p(
        "fireworks",
        "Fireworks AI",
        "https://api.fireworks.ai/inference/v1",
        rules=("fireworks-api-key",),
        keys=("FIREWORKS_API_KEY",),
        allow=_MODELS,
    ),
    _p(
        "replicate",
        "Replicate",
        "https://api.replicate.com/v1",
        rules=("replicate-api-token",),
        keys=("REPLICATE_API_TOKEN", "REPLICATE_API_KEY"),
    ),
    _p(
        "pinecone",
        "Pinecone",
        "https://api.pinecone.io",
        auth="header:Api-Key",
        rules=("pinecone-api-key",),
        keys=("PINECONE_API_KEY",),
    ),
    _p(
        "elevenlabs",
        "ElevenLabs",
        "https://api.elevenlabs.io",
        auth="header:xi-api-key",
        rules=("elevenlabs-api-key",),
        keys=("ELEVENLABS_API_KEY", "ELEVEN_API_KEY"),
    ),
    # gh sends GITHUB_TOKEN to api.github.com whatever GITHUB_API_URL says: no key_env.
    _p(
        "github",
        "GitHub",
        "https://api.github.com",
        rules=(
            "github-ghp",
            "github-gho",
            "github-ghu",
            "github-ghs",
            "github-ghr",
            "github-fine-grained-pat",
        ),
        base_env=("GITHUB_API_URL",),
        keys=("GITHUB_TOKEN", "GH_TOKEN", "GITHUB_PAT", "GITHUB_ACCESS_TOKEN", "GITHUB_API_TOKEN"),
    ),
    _p(
        "gitlab",
        "GitLab",
        "https://gitlab.com/api/v4",
        auth="header:PRIVATE-TOKEN",
        rules=("gitlab-glpat",),
        keys=("GITLAB_TOKEN", "GITLAB_PRIVATE_TOKEN", "GITLAB_ACCESS_TOKEN", "GL_TOKEN"),
    ),
    _p(
        "stripe",
        "Stripe",
        "https://api.stripe.com/v1",
        rules=("stripe-secret-key", "stripe-test-secret-key", "stripe-restricted-key", "stripe-test-restricted-key"),
        keys=("STRIPE_SECRET_KEY", "STRIPE_API_KEY", "STRIPE_KEY", "STRIPE_RESTRICTED_KEY"),
    ),
    _p(
        "slack",
        "Slack",
        "https://slack.com/api",
        rules=("slack-bot-token", "slack-user-token"),
        keys=("SLACK_BOT_TOKEN", "SLACK_TOKEN", "SLACK_USER_TOKEN", "SLACK_API_TOKEN"),
    ),
    _p(
        "twilio",
        "Twilio",
        "https://api.twilio.com/2010-04-01",
        auth="basic:{TWILIO_ACCOUNT_SID}",
        rules=("twilio-auth-token",),
        keys=("TWILIO_AUTH_TOKEN",),
    ),
    _p(
        "sendgrid",
        "SendGrid",
        "https://api.sendgrid.com/v3",
        rules=("sendgrid-api-key",),
        keys=("SENDGRID_API_KEY", "SENDGRID_KEY"),
    ),
    _p(
        "postmark",
        "Postmark",
        "https://api.postmarkapp.com",
        auth="header:X-Postmark-Server-Token",
        rules=("postmark-server-token",),
        keys=("POSTMARK_SERVER_TOKEN", "POSTMARK_API_TOKEN", "POSTMARK_API_KEY", "POSTMARK_TOKEN"),
    ),
    _p(
        "resend",
        "Resend",
        "https://api.resend.com",
        rules=("resend-api-key",),
        keys=("RESEND_API_KEY",),
    ),
    _p(
        "mailgun",
        "Mailgun",
        "https://api.mailgun.net",
        auth="basic:api",
        rules=("mailgun-api-key", "mailgun-api-key-v2"),
        keys=("MAILGUN_API_KEY",),
    ),
    _p(
        "vercel",
        "Vercel",
        "https://api.vercel.com",
        rules=("vercel-token",),
        keys=("VERCEL_TOKEN", "VERCEL_API_TOKEN", "VERCEL_ACCESS_TOKEN"),
    ),
    _p(
        "netlify",
        "Netlify",
        "https://api.netlify.com/api/v1",
        rules=("netlify-pat", "netlify-token"),
        keys=("NETLIFY_AUTH_TOKEN", "NETLIFY_TOKEN"),
    ),
    _p(
        "cloudflare",
        "Cloudflare",
        "https://api.cloudflare.com/client/v4",
        rules=("cloudflare-api-token",),
        keys=("CLOUDFLARE_API_TOKEN", "CF_API_TOKEN"),
    ),
    _p(
        "digitalocean",
        "DigitalOcean",
        "https://api.digitalocean.com/v2",
        rules=("digitalocean-pat",),
        keys=("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN", "DO_API_TOKEN"),
    ),
    # Supabase's API lives at the project's own URL, named in the same .env file.
    _p(
        "supabase",
        "Supabase",
        "{SUPABASE_URL}",
        auth="header:apikey",
        rules=("supabase-secret-key", "supabase-service-role-key"),
        keys=("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_KEY", "SUPABASE_KEY"),
    ),
    _p(
        "sentry",
        "Sentry",
        "https://sentry.io/api/0",
        rules=("sentry-user-token", "sentry-org-token"),
        keys=("SENTRY_AUTH_TOKEN",),
    ),
    # GraphQL APIs: every call is a POST, so nothing is read-only by its method.
    _p(
        "linear",
        "Linear",
        "https://api.linear.app",
        auth="header:Authorization",
        rules=("linear-api-key",),
        keys=("LINEAR_API_KEY", "LINEAR_TOKEN"),
        allow=(),
    ),
    _p(
        "notion",
        "Notion",
        "https://api.notion.com/v1",
        rules=("notion-token", "notion-token-legacy"),
        keys=("NOTION_TOKEN", "NOTION_API_KEY", "NOTION_SECRET", "NOTION_INTEGRATION_TOKEN"),
    ),
    _p(
        "airtable",
        "Airtable",
        "https://api.airtable.com/v0",
        rules=("airtable-pat",),
        keys=("AIRTABLE_API_KEY", "AIRTABLE_TOKEN", "AIRTABLE_PAT"),
    ),
    _p(
        "figma",
        "Figma",
        "https://api.figma.com",
        auth="header:X-Figma-Token",
        rules=("figma-pat",),
        keys=("FIGMA_TOKEN", "FIGMA_ACCESS_TOKEN", "FIGMA_API_KEY"),
    ),
    _p(
        "asana",
        "Asana",
        "https://app.asana.com/api/1.0",
        rules=("asana-pat",),
        keys=("ASANA_ACCESS_TOKEN", "ASANA_TOKEN", "ASANA_PAT"),
    ),
    _p(
        "hubspot",
        "HubSpot",
        "https://api.hubapi.com",
        rules=("hubspot-private-app-token",),
        keys=("HUBSPOT_ACCESS_TOKEN", "HUBSPOT_API_KEY", "HUBSPOT_TOKEN"),
    ),
)

PROVIDERS_BY_NAME: dict[str, Provider] = {p.name: p for p in PROVIDERS}
_BY_RULE: dict[str, Provider] = {rule: p for p in PROVIDERS for rule in p.rules}
_BY_VARIABLE: dict[str, Provider] = {var: p for p in PROVIDERS for var in p.key_names}

# Variables that carry a provider's key besides those above. Claude Code and Anthropic's
# SDKs send ANTHROPIC_AUTH_TOKEN as `Authorization: Bearer`, and Claude Code prefers it to
# ANTHROPIC_API_KEY: a real one left in a session would be the key that is used.
OTHER_KEY_VARIABLES: tuple[str, ...] = ("ANTHROPIC_AUTH_TOKEN",)

# Every variable the catalog knows to hold a key (the SDKs' key variables, the names keys go
# by in .env files, and the ones above): `outloop run` removes each one the operator's own
# environment holds and sets only the session token, in the variables `session_env` names,
# so a real key exported in the operator's shell never reaches the agent.
KEY_VARIABLES: frozenset[str] = frozenset(v for p in PROVIDERS for v in p.key_names) | frozenset(OTHER_KEY_VARIABLES)


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


def provider_named(name: str) -> Provider | None:
    """The catalog's provider called `name` (as `--provider` names it), or None."""
    return PROVIDERS_BY_NAME.get(name.lower())


def provider_for_key(variable: str, rule_id: str | None) -> Provider | None:
    """The provider of a key found in a `.env` file: by its variable's name, else by the rule that found it.

    The name wins: a value a provider-neutral rule found under `OPENAI_API_KEY` is
    OpenAI's, and a Google API key under `GOOGLE_MAPS_KEY` is not Gemini's.
    """
    by_name = _BY_VARIABLE.get(variable.upper())
    if by_name is not None:
        return by_name
    return _BY_RULE.get(rule_id or "")


_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(template: str, variables: Mapping[str, str]) -> str | None:
    """`template` with each `{VAR}` replaced by that variable's value; None when one is missing."""
    missing = False

    def value(m: re.Match[str]) -> str:
        nonlocal missing
        got = variables.get(m.group(1), "")
        if not got:
            missing = True
        return got

    out = _FIELD.sub(value, template)
    return None if missing else out.rstrip("/") if template.startswith("{") else out


def template_fields(template: str) -> list[str]:
    """The variables a template names (`{SUPABASE_URL}` -> ['SUPABASE_URL'])."""
    return _FIELD.findall(template)


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
