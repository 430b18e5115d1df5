"""Keys the way people really paste them: a corpus for scoring leak scanners.

Each example is a snippet in the shape provider documentation and scanners' own
rule examples show keys in: curl lines and headers, YAML and JSON, ini and
properties files, connection strings, multi-line PEM blocks, PHP / JS / Ruby
assignments, prose and logs. Every key is generated here from the provider's
documented format (prefix, alphabet, length) with a seeded random source: none
is real, and none is a provider's published example.

    python bench/realkeys.py OUT_DIR      # writes env/NN/.env and src/NN/deploy.EXT

`write(root)` writes each snippet twice, once as a `.env` file and once as a
source file of its own kind, after two filler lines, and returns where each key
sits (the snippet's line range), so a scanner is credited when it reports any
line of the snippet.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

A62 = string.ascii_letters + string.digits
UPPER36 = string.ascii_uppercase + string.digits
LOWER36 = string.ascii_lowercase + string.digits
HEX = "0123456789abcdef"
B64 = A62 + "+/"
B64URL = A62 + "-_"
DIGITS = string.digits


@dataclass(frozen=True)
class Example:
    name: str
    ext: str
    text: str


@dataclass(frozen=True)
class Planted:
    example: str
    path: Path
    first: int  # 1-based line range of the snippet in the file
    last: int
    env: bool


class Keys:
    def __init__(self, seed: int = 19) -> None:
        self.r = random.Random(seed)  # noqa: S311 - fake keys for a benchmark

    def s(self, alphabet: str, n: int) -> str:
        return "".join(self.r.choice(alphabet) for _ in range(n))

    def uuid(self) -> str:
        h = self.s(HEX, 32)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def password(self) -> str:
        return self.s(string.ascii_letters, 6) + self.s(DIGITS, 3) + self.r.choice("!#%*+") + self.s(A62, 4)

    def jwt(self) -> str:
        def b64(doc: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

        head = b64({"alg": "HS256", "typ": "JWT"})
        body = b64({"sub": self.uuid(), "iat": 1735689600, "role": "service"})
        return f"{head}.{body}.{self.s(B64URL, 43)}"

    def pem(self, kind: str = "RSA PRIVATE KEY", lines: int = 12) -> str:
        body = "\n".join(self.s(B64, 64) for _ in range(lines))
        return f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"


def examples(k: Keys) -> list[Example]:
    """The corpus: one Example per key shape and context."""
    pem = k.pem()
    ex: list[Callable[[], Example]] = [
        lambda: Example(
            "aws-credentials-ini",
            ".ini",
            f"[default]\naws_access_key_id = AKIA{k.s('ABCDEFGHIJKLMNOPQRSTUVWXYZ234567', 16)}\n"
            f"aws_secret_access_key = {k.s(B64, 40)}",
        ),
        lambda: Example(
            "github-pat-in-clone-url", ".sh", f"git clone https://ghp_{k.s(A62, 36)}@github.com/acme/infra.git"
        ),
        lambda: Example(
            "github-fine-grained-export", ".sh", f"export GH_TOKEN=github_pat_{k.s(A62, 22)}_{k.s(A62, 59)}"
        ),
        lambda: Example(
            "github-app-token-remote",
            ".sh",
            f"git remote set-url origin https://x-access-token:ghs_{k.s(A62, 36)}@github.com/acme/app",
        ),
        lambda: Example("openai-project-key-python", ".py", f'client = OpenAI(api_key="sk-proj-{k.s(B64URL, 156)}")'),
        lambda: Example("openai-legacy-json", ".json", f'{{\n  "openai": {{"apiKey": "sk-{k.s(A62, 48)}"}}\n}}'),
        lambda: Example(
            "anthropic-curl-header",
            ".sh",
            "curl https://api.anthropic.com/v1/messages \\\n"
            f'  -H "x-api-key: sk-ant-api03-{k.s(B64URL, 93)}AA" \\\n'
            '  -H "anthropic-version: 2023-06-01"',
        ),
        lambda: Example(
            "stripe-curl-user", ".sh", f"curl https://api.stripe.com/v1/charges \\\n  -u sk_live_{k.s(A62, 99)}:"
        ),
        lambda: Example(
            "slack-bot-yaml", ".yaml", f"slack:\n  token: xoxb-{k.s(DIGITS, 12)}-{k.s(DIGITS, 13)}-{k.s(A62, 24)}"
        ),
        lambda: Example("slack-bot-one-number", ".py", f'SLACK_BOT_TOKEN = "xoxb-{k.s(DIGITS, 12)}-{k.s(A62, 24)}"'),
        lambda: Example(
            "slack-webhook-js",
            ".js",
            f"const hook = 'https://hooks.slack.com/services/T{k.s(UPPER36, 10)}/B{k.s(UPPER36, 10)}/{k.s(A62, 24)}';",
        ),
        lambda: Example(
            "google-key-in-url",
            ".js",
            f'fetch("https://maps.googleapis.com/maps/api/geocode/json?address=x&key=AIza{k.s(B64URL, 35)}")',
        ),
        lambda: Example(
            "gcp-service-account-json",
            ".json",
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "acme-prod",
                    "private_key_id": k.s(HEX, 40),
                    "private_key": k.pem("PRIVATE KEY", 8) + "\n",
                    "client_email": "ci@acme-prod.iam.gserviceaccount.com",
                },
                indent=2,
            ),
        ),
        lambda: Example("pem-in-env-multiline", ".env.sample", f'PRIVATE_KEY="{pem}"'),
        lambda: Example(
            "pem-base64",
            ".yaml",
            "tls:\n  key: " + base64.b64encode((k.pem("RSA PRIVATE KEY", 10) + "\n").encode()).decode(),
        ),
        lambda: Example("openssh-key-file", ".key", k.pem("OPENSSH PRIVATE KEY", 7)),
        lambda: Example("vault-short-service-token", ".sh", f"vault login hvs.{k.s(A62, 24)}"),
        lambda: Example("vault-batch-token", ".sh", f"export VAULT_TOKEN=hvb.{k.s(B64URL, 60)}"),
        lambda: Example("vault-recovery-token", ".sh", f'VAULT_TOKEN="hvr.{k.s(A62, 24)}" vault operator raft'),
        lambda: Example(
            "telegram-bot-url",
            ".py",
            f'requests.get("https://api.telegram.org/bot{k.s(DIGITS, 10)}:AAF{k.s(B64URL, 32)}/getMe")',
        ),
        lambda: Example("telegram-token-not-aa", ".py", f'TELEGRAM_BOT_TOKEN = "{k.s(DIGITS, 10)}:{k.s(B64URL, 35)}"'),
        lambda: Example("newrelic-admin", ".yaml", f"newrelic:\n  admin_api_key: NRAA-{k.s(A62, 27)}"),
        lambda: Example("newrelic-query", ".yaml", f"insights:\n  query_key: NRIQ-{k.s(B64URL, 32)}"),
        lambda: Example(
            "newrelic-rest", ".sh", f"curl -H 'X-Api-Key:NRRA-{k.s(HEX, 42)}' https://api.newrelic.com/v2/apps.json"
        ),
        lambda: Example(
            "azure-app-configuration",
            ".json",
            f'{{"ConnectionStrings": {{"AppConfig": "Endpoint=https://acme.azconfig.io;Id={k.s(A62, 4)}-l0-s0:'
            f'{k.s(A62, 20)};Secret={k.s(B64, 43)}="}}}}',
        ),
        lambda: Example(
            "azure-storage-connection",
            ".cs",
            f'var conn = "DefaultEndpointsProtocol=https;AccountName=acmeprod;AccountKey={k.s(B64, 86)}==;'
            'EndpointSuffix=core.windows.net";',
        ),
        lambda: Example(
            "okta-ssws",
            ".sh",
            f'curl -H "Authorization: SSWS 00{k.s(B64URL, 40)}" https://acme.okta.com/api/v1/users',
        ),
        lambda: Example(
            "twilio-curl",
            ".sh",
            f"curl -X POST https://api.twilio.com/2010-04-01/Accounts/AC{k.s(HEX, 32)}/Messages.json \\\n"
            f"  -u AC{k.s(HEX, 32)}:{k.s(HEX, 32)}",
        ),
        lambda: Example(
            "sendgrid-bearer",
            ".sh",
            f"curl -H 'Authorization: Bearer SG.{k.s(B64URL, 22)}.{k.s(B64URL, 43)}' https://api.sendgrid.com/v3/mail/send",
        ),
        lambda: Example(
            "mailgun-user", ".sh", f"curl -s --user 'api:key-{k.s(HEX, 32)}' https://api.mailgun.net/v3/acme/messages"
        ),
        lambda: Example(
            "datadog-header",
            ".sh",
            f'curl -X GET "https://api.datadoghq.com/api/v1/validate" -H "DD-API-KEY: {k.s(HEX, 32)}"',
        ),
        lambda: Example("npmrc-token", ".npmrc", f"//registry.npmjs.org/:_authToken=npm_{k.s(A62, 36)}"),
        lambda: Example(
            "pypirc-token",
            ".ini",
            f"[pypi]\nusername = __token__\npassword = pypi-AgEIcHlwaS5vcmc{k.s(B64URL, 140)}",
        ),
        lambda: Example("docker-login-pat", ".sh", f"docker login -u acmeci -p dckr_pat_{k.s(B64URL, 27)}"),
        lambda: Example("mysql-p-flag", ".sh", f"mysql -h db.internal -u app -p{k.password()} app_prod < dump.sql"),
        lambda: Example("redis-cli-a", ".sh", f"redis-cli -h cache.internal -a {k.password()} ping"),
        lambda: Example("sshpass", ".sh", f"sshpass -p '{k.password()}' ssh deploy@10.0.4.12"),
        lambda: Example(
            "postgres-url", ".yaml", f"database:\n  url: postgresql://app:{k.s(A62, 20)}@db.internal:5432/app"
        ),
        lambda: Example(
            "mongodb-srv", ".py", f'MONGO = "mongodb+srv://admin:{k.s(A62, 16)}@cluster0.ab1cd.mongodb.net/prod"'
        ),
        lambda: Example(
            "sqlserver-connection",
            ".json",
            f'{{"ConnectionStrings": {{"Default": "Server=tcp:acme.database.windows.net,1433;Database=app;'
            f'User Id=app;Password={k.password()};Encrypt=True;"}}}}',
        ),
        lambda: Example("jwt-bearer", ".sh", f"curl -H 'Authorization: Bearer {k.jwt()}' https://api.acme.dev/v1/me"),
        lambda: Example(
            "opaque-bearer-header",
            ".py",
            f'headers = {{"Authorization": "Bearer {k.s(A62, 40)}", "Accept": "application/json"}}',
        ),
        lambda: Example(
            "basic-auth-header",
            ".http",
            "GET /api/v1/builds HTTP/1.1\nHost: ci.acme.dev\nAuthorization: Basic "
            + base64.b64encode(f"deploy:{k.password()}".encode()).decode(),
        ),
        lambda: Example("curl-user-password", ".sh", f"curl -u jenkins:{k.password()} https://ci.acme.dev/api/json"),
        lambda: Example(
            "url-access-token",
            ".md",
            f"Open https://graph.acme.dev/v2/me?fields=id&access_token={k.s(A62, 48)} to test.",
        ),
        lambda: Example(
            "url-api-key", ".py", f'URL = "https://api.acme.dev/v1/data?api_key={k.s(HEX, 32)}&format=json"'
        ),
        lambda: Example(
            "php-variable", ".php", f"<?php\n$api_key = '{k.s(A62, 32)}';\n$client = new Client($api_key);"
        ),
        lambda: Example("php-define", ".php", f"<?php\ndefine('AUTH_KEY', '{k.s(A62, 40)}');"),
        lambda: Example("php-array", ".php", f"<?php\nreturn [\n    'stripe' => ['secret' => '{k.s(A62, 32)}'],\n];"),
        lambda: Example("js-const", ".js", f"const apiKey = '{k.s(A62, 32)}';\nexport default {{ apiKey }};"),
        lambda: Example("js-object", ".ts", f'export const config = {{\n  clientSecret: "{k.s(B64URL, 40)}",\n}};'),
        lambda: Example("ruby-config", ".rb", f"config.api_key = '{k.s(HEX, 32)}'"),
        lambda: Example("java-properties", ".properties", f"spring.datasource.password={k.password()}"),
        lambda: Example(
            "compose-yaml-password",
            ".yaml",
            f"services:\n  db:\n    environment:\n      POSTGRES_PASSWORD: {k.password()}",
        ),
        lambda: Example(
            "json-client-secret", ".json", f'{{\n  "client_id": "{k.uuid()}",\n  "client_secret": "{k.s(A62, 34)}"\n}}'
        ),
        lambda: Example(
            "prose-api-key", ".md", f"Your API key is {k.s(A62, 32)}. Keep it somewhere safe; it is shown once."
        ),
        lambda: Example("log-token", ".log", f"2025-05-02T10:11:12Z INFO auth: refreshed, token={k.s(B64URL, 43)}"),
        lambda: Example("cloudflare-token", ".sh", f"export CLOUDFLARE_API_TOKEN={k.s(B64URL, 40)}"),
        lambda: Example("doctl-init", ".sh", f"doctl auth init -t dop_v1_{k.s(HEX, 64)}"),
        lambda: Example(
            "shopify-header",
            ".sh",
            f"curl -H 'X-Shopify-Access-Token: shpat_{k.s(HEX, 32)}' https://acme.myshopify.com/admin/api/2024-01/shop.json",
        ),
        lambda: Example(
            "huggingface-login", ".sh", f"huggingface-cli login --token hf_{k.s(string.ascii_letters, 34)}"
        ),
        lambda: Example(
            "discord-login", ".js", f"client.login('M{k.s(B64URL, 25)}.{k.s(B64URL, 6)}.{k.s(B64URL, 38)}');"
        ),
        lambda: Example(
            "gitlab-private-token",
            ".sh",
            f'curl --header "PRIVATE-TOKEN: glpat-{k.s(B64URL, 20)}" https://gitlab.com/api/v4/projects',
        ),
        lambda: Example(
            "atlassian-curl",
            ".sh",
            f"curl -u me@acme.dev:ATATT3{k.s(B64URL, 186)} https://acme.atlassian.net/rest/api/3/myself",
        ),
        lambda: Example(
            "sentry-dsn",
            ".py",
            f'sentry_sdk.init(dsn="https://{k.s(HEX, 32)}@o{k.s(DIGITS, 6)}.ingest.us.sentry.io/{k.s(DIGITS, 7)}")',
        ),
        lambda: Example("google-oauth-secret", ".json", f'{{"web": {{"client_secret": "GOCSPX-{k.s(B64URL, 28)}"}}}}'),
        lambda: Example(
            "azure-ad-secret",
            ".sh",
            f"az login --service-principal -u {k.uuid()} -p {k.s(A62, 3)}8Q~{k.s(A62 + '_~.-', 34)} --tenant acme",
        ),
        lambda: Example(
            "terraformrc",
            ".tfrc",
            f'credentials "app.terraform.io" {{\n  token = "{k.s(A62, 14)}.atlasv1.{k.s(B64URL, 67)}"\n}}',
        ),
        lambda: Example("netrc", ".netrc", f"machine api.heroku.com\n  login me@acme.dev\n  password {k.uuid()}"),
        lambda: Example("supabase-service-role", ".ts", f"const supabase = createClient(url, '{k.jwt()}');"),
        lambda: Example("groq-key", ".py", f'Groq(api_key="gsk_{k.s(A62, 52)}")'),
        lambda: Example(
            "slack-user-token",
            ".py",
            f'WebClient(token="xoxp-{k.s(DIGITS, 12)}-{k.s(DIGITS, 12)}-{k.s(DIGITS, 13)}-{k.s(HEX, 32)}")',
        ),
        lambda: Example("yaml-api-key", ".yaml", f"integrations:\n  pagerduty:\n    api_key: {k.s(B64URL, 20)}"),
        lambda: Example("export-secret-key", ".sh", f"export SECRET_KEY='{k.s(A62, 50)}'"),
        lambda: Example("kube-secret-stringdata", ".yaml", f"kind: Secret\nstringData:\n  password: {k.password()}"),
        lambda: Example(
            "dotnet-user-secret", ".json", f'{{"Authentication:Google:ClientSecret": "{k.s(B64URL, 24)}"}}'
        ),
    ]
    return [make() for make in ex]


FILLER = ("# settings for the deploy scripts", "")
_DOTFILES = {".npmrc": ".npmrc", ".netrc": ".netrc", ".tfrc": ".terraformrc"}


def write(root: Path, seed: int = 19) -> list[Planted]:
    """Write every example as `.env` and as a source file; return where each one sits."""
    planted: list[Planted] = []
    for i, ex in enumerate(examples(Keys(seed))):
        lines = ex.text.splitlines()
        body = "\n".join([*FILLER, *lines]) + "\n"
        first, last = len(FILLER) + 1, len(FILLER) + len(lines)
        for env in (True, False):
            folder = root / ("env" if env else "src") / f"{i:02d}-{ex.name}"
            folder.mkdir(parents=True, exist_ok=True)
            # Not "example.*": some scanners skip files named like documentation samples.
            name = ".env" if env else _DOTFILES.get(ex.ext, f"deploy{ex.ext}")
            (folder / name).write_text(body)
            planted.append(Planted(ex.name, folder / name, first, last, env))
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    planted = write(args.out)
    print(f"{len(planted) // 2} examples, each as .env and as source, under {args.out}")


if __name__ == "__main__":
    main()
