"""A synthetic workspace corpus for scoring leak scanners.

Thousands of files of realistic code, config, logs and docs, full of hard
negatives (UUIDs, git SHAs, sha256 digests, `sha512-` integrity strings, base64
blobs, example JWTs, placeholder env values), with fake keys of every leak rule
planted in `.env`, Python, JS, JSON, YAML, Markdown and log lines.

Rules that apply only to `.env`-like files by design (not `confident`) are
planted only there. Every planted key is one of the rule's own generated
examples (built from the provider's documented format, never a real key).

    python bench/corpus.py OUT_DIR [--files N]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.leaks.rules import RULES, Rule  # noqa: E402


@dataclass(frozen=True)
class Plant:
    path: Path
    line: int  # 1-based line where the secret starts
    rule: str


@dataclass
class Corpus:
    root: Path
    plants: list[Plant] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def planted_files(self) -> set[Path]:
        return {p.path for p in self.plants}

    def clean_files(self) -> list[Path]:
        planted = self.planted_files
        return [f for f in self.files if f not in planted]


WORDS = (
    "request response handler client server config value user account order invoice "
    "payment session cache queue worker retry timeout batch record stream event metric "
    "token_count model prompt index search result filter page limit offset status "
    "created updated deleted enabled region bucket object path route service build"
).split()
PLACEHOLDERS = (
    "your-api-key-here",
    "changeme",
    "<your-token>",
    "${SECRET_FROM_VAULT}",
    "xxxxxxxxxxxxxxxx",
    "",
    "sk-...",
    "replace-me",
    "$(op read op://dev/api/key)",
    "TODO",
    "outloop:github",
)


class Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)  # noqa: S311 - test data, not cryptography

    def word(self) -> str:
        return self.r.choice(WORDS)

    def ident(self) -> str:
        return "_".join(self.r.choice(WORDS).split("_")[0] for _ in range(self.r.randint(1, 3)))

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.r.getrandbits(128)))

    def sha1(self) -> str:
        return hashlib.sha1(str(self.r.random()).encode(), usedforsecurity=False).hexdigest()

    def sha256(self) -> str:
        return hashlib.sha256(str(self.r.random()).encode()).hexdigest()

    def integrity(self) -> str:
        return "sha512-" + base64.b64encode(hashlib.sha512(str(self.r.random()).encode()).digest()).decode()

    def b64(self, n: int) -> str:
        return base64.b64encode(self.r.randbytes(n)).decode()

    def jwt_example(self) -> str:
        head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
        body = base64.urlsafe_b64encode(json.dumps({"sub": self.uuid()}).encode()).decode()
        return f"{head}.{body.rstrip('=')}.{base64.urlsafe_b64encode(self.r.randbytes(32)).decode().rstrip('=')}"

    def ts(self) -> str:
        return (
            f"2025-{self.r.randint(1, 12):02d}-{self.r.randint(1, 28):02d}T"
            f"{self.r.randint(0, 23):02d}:{self.r.randint(0, 59):02d}:"
            f"{self.r.randint(0, 59):02d}.{self.r.randint(0, 999):03d}Z"
        )

    def sentence(self) -> str:
        return " ".join(self.word() for _ in range(self.r.randint(6, 14))).capitalize() + "."


# --- clean file bodies ---------------------------------------------------------------------


def py_file(g: Gen, n: int) -> list[str]:
    out = ['"""' + g.sentence() + '"""', "", "import hashlib", "import uuid", ""]
    for _ in range(n):
        name = g.ident()
        out += [
            f"def {name}({g.word()}, {g.word()}=None):",
            f'    """{g.sentence()}"""',
            f'    request_id = "{g.uuid()}"',
            f'    digest = "{g.sha256()}"',
            f"    token_count = len({g.word()}) * {g.r.randint(2, 999)}",
            '    password = os.environ.get("DB_PASSWORD")',
            f"    api_key = settings.{g.word().upper()}_API_KEY",
            f'    commit = "{g.sha1()}"',
            f"    return {{'{g.word()}': {g.word()}, 'status': {g.r.randint(200, 599)}}}",
            "",
        ]
    return out


def js_file(g: Gen, n: int) -> list[str]:
    out = [f"// {g.sentence()}", "import { createHash } from 'node:crypto';", ""]
    for _ in range(n):
        out += [
            f"export async function {g.ident()}({g.word()}) {{",
            f"  const id = '{g.uuid()}';",
            f'  const etag = "{g.sha1()}";',
            f"  const apiKey = process.env.{g.word().upper()}_API_KEY;",
            f"  const res = await fetch(`/api/${{id}}/{g.word()}?limit={g.r.randint(1, 100)}`);",
            f"  // {g.sentence()}",
            "  return res.json();",
            "}",
            "",
        ]
    return out


def json_file(g: Gen, n: int) -> list[str]:
    deps = {
        f"node_modules/{g.ident()}": {
            "version": f"{g.r.randint(0, 9)}.{g.r.randint(0, 20)}.{g.r.randint(0, 40)}",
            "resolved": f"https://registry.npmjs.org/{g.word()}/-/{g.word()}.tgz",
            "integrity": g.integrity(),
        }
        for _ in range(n)
    }
    doc = {
        "name": g.word(),
        "lockfileVersion": 3,
        "requires": True,
        "packages": deps,
        "apiKey": "${API_KEY}",
        "sessionSecret": "changeme",
    }
    return json.dumps(doc, indent=2).splitlines()


def yaml_file(g: Gen, n: int) -> list[str]:
    out = ["version: '3.9'", "services:"]
    for _ in range(n):
        svc = g.ident()
        out += [
            f"  {svc}:",
            f"    image: ghcr.io/acme/{svc}@sha256:{g.sha256()}",
            "    environment:",
            "      DATABASE_URL: postgres://postgres:postgres@db:5432/app",
            "      API_KEY: ${API_KEY}",
            f"      REQUEST_TIMEOUT: {g.r.randint(1, 120)}",
            f"      INSTANCE_ID: {g.uuid()}",
            f"    command: ['{g.word()}', '--{g.word()}', '{g.r.randint(1, 9999)}']",
        ]
    return out


def md_file(g: Gen, n: int) -> list[str]:
    out = [f"# {g.word().capitalize()} {g.word()}", ""]
    for _ in range(n):
        out += [
            g.sentence() + " " + g.sentence(),
            "",
            "```bash",
            "export OPENAI_API_KEY=your-api-key-here",
            "export GITHUB_TOKEN=<your-token>",
            f"curl -H 'Authorization: Bearer $TOKEN' https://api.example.com/v1/{g.word()}",
            "```",
            "",
            f"Fixed in commit {g.sha1()[:12]} ({g.sha1()}). Example JWT: `{g.jwt_example()}`",
            f"Checksum: `sha256:{g.sha256()}`. Trace `{g.uuid()}`.",
            "",
        ]
    return out


def log_file(g: Gen, n: int) -> list[str]:
    levels = ("INFO", "DEBUG", "WARN", "ERROR")
    return [
        f"{g.ts()} {g.r.choice(levels)} [{g.word()}] request_id={g.uuid()} "
        f"trace={g.sha1()[:16]} user={g.r.randint(1, 99999)} path=/{g.word()}/{g.word()} "
        f"status={g.r.randint(200, 599)} ms={g.r.randint(1, 3000)} etag={g.sha256()[:32]}"
        for _ in range(n * 8)
    ]


def env_example(g: Gen, n: int) -> list[str]:
    out = [f"# {g.sentence()}"]
    for _ in range(n):
        out += [
            f"{g.word().upper()}_API_KEY={g.r.choice(PLACEHOLDERS)}",
            f"{g.word().upper()}_SECRET={g.r.choice(PLACEHOLDERS)}",
            f"{g.word().upper()}_URL=https://{g.word()}.example.com/v{g.r.randint(1, 3)}",
            f"{g.word().upper()}_TOKEN_TTL={g.r.randint(60, 86400)}",
            f"{g.word().upper()}_ID={g.uuid()}",
            f"DEBUG={g.r.choice(['true', 'false'])}",
        ]
    return out


def toml_file(g: Gen, n: int) -> list[str]:
    out = ["[tool.app]", f'name = "{g.word()}"']
    for _ in range(n):
        out += [
            f"[{g.word()}.{g.word()}]",
            f'hash = "{g.sha256()}"',
            f'id = "{g.uuid()}"',
            f"retries = {g.r.randint(0, 9)}",
            f'blob = "{g.b64(48)}"',
        ]
    return out


KINDS = {
    ".py": py_file,
    ".js": js_file,
    ".json": json_file,
    ".yaml": yaml_file,
    ".md": md_file,
    ".log": log_file,
    ".toml": toml_file,
}

# --- planting ------------------------------------------------------------------------------

_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
FORMATS = (".env", ".py", ".js", ".json", ".yaml", ".md", ".log")


def _name_and_value(rule: Rule, example: str) -> tuple[str, str]:
    m = _ASSIGN.match(example)
    if m:
        return m.group(1), m.group(2)
    # A bare token: give it the kind of name people give keys.
    return rule.id.upper().replace("-", "_") + "_KEY", example.split(" = ", 1)[-1].strip('"')


def render(fmt: str, name: str, value: str, g: Gen) -> str:
    """One line (or block) holding `name` = `value` the way `fmt` files write it."""
    multiline = "\n" in value
    if fmt == ".env":
        return f'{name}="{value}"' if multiline else f"{name}={value}"
    if fmt == ".py":
        return f'{name} = """{value}"""' if multiline else f'{name} = "{value}"'
    if fmt == ".js":
        return f"const {name} = `{value}`;" if multiline else f'const config = {{ {name}: "{value}", retries: 3 }};'
    if fmt == ".json":
        return f"  {json.dumps(name)}: {json.dumps(value)},"
    if fmt == ".yaml":
        if multiline:
            return f"{name.lower()}: |\n" + "\n".join("  " + ln for ln in value.splitlines())
        return f"  {name.lower()}: {value}"
    if fmt == ".md":
        return f"```\nexport {name}='{value}'\n```" if multiline else f"Set `{name}={value}`."
    return f"{g.ts()} INFO [boot] loaded {name}={value} from environment"


def generate(root: Path, files: int = 3000, seed: int = 7) -> Corpus:
    """Write the corpus under `root` and return where every key was planted."""
    g = Gen(seed)
    corpus = Corpus(root)
    root.mkdir(parents=True, exist_ok=True)
    kinds = list(KINDS)
    for i in range(files):
        folder = root / f"svc{i % 40}" / g.r.choice(["src", "lib", "docs", "config", "logs"])
        folder.mkdir(parents=True, exist_ok=True)
        if i % 25 == 0:
            path = folder / (".env.example" if i % 50 == 0 else "defaults.env")
            lines = env_example(g, g.r.randint(2, 8))
        else:
            ext = kinds[i % len(kinds)]
            path = folder / f"{g.ident()}_{i}{ext}"
            lines = KINDS[ext](g, g.r.randint(2, 12))
        path.write_text("\n".join(lines) + "\n")
        corpus.files.append(path)
    for rule in RULES:
        formats = FORMATS if rule.confident else (".env",)
        for k, fmt in enumerate(formats):
            # Prefer a KEY=value example: it renders naturally in every format.
            assigns = [e for e in rule.true_positives if _ASSIGN.match(e)]
            example = (assigns or list(rule.true_positives))[k % len(assigns or rule.true_positives)]
            name, value = _name_and_value(rule, example)
            folder = root / f"planted{k}" / rule.id
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / (".env" if fmt == ".env" else f"config{fmt}")
            filler = KINDS.get(fmt, env_example)(g, 2)
            if fmt == ".json":
                filler = ["{", '  "name": "demo",']
                tail = ['  "end": true', "}"]
            else:
                tail = []
            block = render(fmt, name, value, g)
            if fmt == ".json" and value.startswith("{"):
                block = value  # a whole JSON document (a service-account key file)
                filler, tail = [], []
            line = len(filler) + 1
            text = "\n".join([*filler, block, *tail]) + "\n"
            if "\n" in block and fmt in (".yaml", ".md"):
                line += 1  # the value starts on the line after the key / fence
            path.write_text(text)
            corpus.files.append(path)
            corpus.plants.append(Plant(path, line, rule.id))
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=3000)
    args = parser.parse_args()
    corpus = generate(args.out, args.files)
    size = sum(f.stat().st_size for f in corpus.files)
    print(f"{len(corpus.files)} files, {size / 1e6:.1f} MB, {len(corpus.plants)} planted keys")


if __name__ == "__main__":
    main()
