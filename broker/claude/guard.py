"""What a coding agent's tool call may not touch: the rules behind `outloop hook pre`.

Plain functions over the tool name and input that Claude Code sends to a
PreToolUse hook. They refuse reading or editing `.env`-like files, private key
and credential files and Outloop's own config and state, and shell commands that
print such files or dump the environment. The answer is a short description of
what was refused, or None.

This is a guard rail for a cooperative agent, not a sandbox: a shell command can
always be written in a way no parser sees through. The post-tool hook, the leak
watcher and the transcript watcher catch what slips past.
"""

from __future__ import annotations

import os
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path, PurePath

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: the pre hook starts on this module
    from collections.abc import Iterable, Sequence

# `.env.example` and friends are templates with placeholders, and agents need them.
ENV_TEMPLATE_SUFFIXES = ("example", "sample", "template", "dist", "defaults", "schema")
PRIVATE_KEY_NAMES = frozenset(
    {
        "id_rsa",
        "id_dsa",
        "id_ecdsa",
        "id_ed25519",
        "id_ecdsa_sk",
        "id_ed25519_sk",
        "identity",
    }
)
PRIVATE_KEY_GLOBS = ("*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk", "*.p8")
CREDENTIAL_FILES = frozenset(
    {
        ".netrc",
        "_netrc",
        ".pgpass",
        ".git-credentials",
        ".pypirc",
        ".npmrc",
        "application_default_credentials.json",
        "credentials.db",
        "access_tokens.db",
    }
)
# Files identified by their folder as well as their name.
CREDENTIAL_PATHS = (
    (".aws", "credentials"),
    (".docker", "config.json"),
    (".kube", "config"),
    (".config/gh", "hosts.yml"),
)

TOOL_PATH_KEYS = {
    "Read": ("file_path",),
    "Edit": ("file_path",),
    "MultiEdit": ("file_path",),
    "Write": ("file_path",),
    "NotebookEdit": ("notebook_path",),
    "NotebookRead": ("notebook_path",),
    "Grep": ("path",),
    "Glob": ("path",),
    "LS": ("path",),
}
# Tools whose pattern argument names files (Glob's pattern, Grep's glob filter).
TOOL_PATTERN_KEYS = {"Glob": ("pattern",), "Grep": ("glob",)}
# Listing a folder that holds secrets shows names, not values.
LISTING_TOOLS = frozenset({"Glob", "Grep", "LS"})
OUTLOOP_KIND = "Outloop's own config or state"
# Tools whose `command` is a shell command line (Monitor runs one and streams its output).
SHELL_TOOLS = frozenset({"Bash", "Monitor"})


class Protected:
    """Folders no agent tool may touch at all: Outloop's config and state.

    A plain value class, not a dataclass: the pre hook starts on this module, and
    dataclasses (through inspect) would be a fifth of its start-up.
    """

    __slots__ = ("folders",)

    def __init__(self, folders: tuple[Path, ...] = ()) -> None:
        self.folders = folders

    def __repr__(self) -> str:
        return f"Protected(folders={self.folders!r})"

    def __eq__(self, other: object) -> bool:
        return self.folders == other.folders if isinstance(other, Protected) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.folders)

    def holds(self, path: Path) -> bool:
        return any(path == f or f in path.parents for f in self.folders)


def classify_name(name: str) -> str | None:
    """What kind of secret-holding file `name` (one path component) is, or None."""
    low = name.lower()
    if low in (".env", ".envrc") or low.endswith(".env"):
        return "an .env file"
    if low.startswith(".env."):
        suffix = low[len(".env.") :]
        if suffix.split(".")[-1] in ENV_TEMPLATE_SUFFIXES or suffix in ENV_TEMPLATE_SUFFIXES:
            return None
        return "an .env file"
    if low in PRIVATE_KEY_NAMES or any(fnmatch(low, g) for g in PRIVATE_KEY_GLOBS):
        return "a private key file"
    if low in CREDENTIAL_FILES:
        return "a credentials file"
    return None


# Patterns are kept as strings and compiled on first use (re caches them): a hook
# process checks one command, and most commands never need most patterns.
PROC_ENVIRON = r"^/proc/[^/]+(?:/task/[^/]+)?/environ$"
ENVIRON_KIND = "the process environment"


def classify_path(path: Path, protected: Protected) -> str | None:
    """What secret-holding file or folder `path` (absolute) is, or None."""
    if protected.holds(path):
        return OUTLOOP_KIND
    if path.as_posix().startswith("/proc/") and re.match(PROC_ENVIRON, path.as_posix()):
        return ENVIRON_KIND
    kind = classify_name(path.name)
    if kind is not None:
        return kind
    text = path.as_posix()
    for folder, name in CREDENTIAL_PATHS:
        if text.endswith(f"/{folder}/{name}"):
            return "a credentials file"
    if (
        "/.ssh/" in text
        and not path.name.endswith(".pub")
        and path.name not in ("known_hosts", "known_hosts.old", "config", "authorized_keys")
    ):
        return "a private key file"
    return None


def classify_pattern(pattern: str) -> str | None:
    """Whether a file-name glob explicitly targets secret-holding files.

    `**/*` does not (it matches everything, secrets included, but only lists names);
    `**/.env*`, `*.pem` or `id_rsa*` do.
    """
    last = PurePath(pattern.strip()).name if pattern.strip() else ""
    for alternative in _brace_alternatives(last):
        literal = re.sub(r"[*?]|\[[^\]]*\]", "", alternative)
        if not literal:
            continue
        if literal.lower().startswith((".env", ".envrc")) and classify_name(literal) is not None:
            return "an .env file"
        if literal.lower().endswith(".env") or literal.lower() == ".env.":
            return "an .env file"
        kind = classify_name(literal)
        if kind is not None:
            return kind
        if alternative.lower().startswith("id_") and literal.lower().rstrip(".") in (*PRIVATE_KEY_NAMES, "id_"):
            return "a private key file"
    return None


def _brace_alternatives(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    out: list[str] = []
    for alt in m.group(1).split(","):
        out.extend(_brace_alternatives(text[: m.start()] + alt + text[m.end() :]))
    return out


def resolve(raw: str, cwd: Path) -> Path:
    """An argument as an absolute, normalised path: ~ and $HOME expanded, relative to `cwd`.

    Symlinks are not followed here; callers check the link and its target both.
    """
    text = raw.replace("${HOME}", "~").replace("$HOME", "~")
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        p = cwd / p
    return Path(os.path.normpath(p))


def path_kind(path: Path, protected: Protected) -> str | None:
    """`classify_path` for the path as written and for where it leads (a link to a secret)."""
    kind = classify_path(path, protected)
    if kind is not None:
        return kind
    try:
        real = path.resolve()
    except (OSError, RuntimeError):
        return None
    return classify_path(real, protected) if real != path else None


# -- tool calls ---------------------------------------------------------------------


def tool_refusal(tool: str, tool_input: dict[str, object], cwd: Path, protected: Protected) -> str | None:
    """Why a built-in tool call must not run, or None when it may."""
    if tool in SHELL_TOOLS:
        command = tool_input.get("command")
        return bash_refusal(command, cwd, protected) if isinstance(command, str) else None
    for key in TOOL_PATH_KEYS.get(tool, ()):
        value = tool_input.get(key)
        if not isinstance(value, str) or not value:
            continue
        path = resolve(value, cwd)
        kind = path_kind(path, protected)
        if kind is None:
            continue
        # Searching or listing a folder shows names, not secrets; Outloop's folders stay shut.
        if tool in LISTING_TOOLS and kind != OUTLOOP_KIND and path.is_dir():
            continue
        return f"{value} is {kind}"
    for key in TOOL_PATTERN_KEYS.get(tool, ()):
        value = tool_input.get(key)
        if isinstance(value, str) and value:
            kind = classify_pattern(value)
            if kind is not None:
                return f"the pattern {value!r} targets {kind}"
    return None


# -- shell commands -------------------------------------------------------------------

CONTROL = frozenset({"|", "||", "&&", ";", ";;", "&", "|&", "(", ")", "{", "}", "!"})
WRAPPERS = frozenset(
    {
        "sudo",
        "command",
        "builtin",
        "exec",
        "nohup",
        "time",
        "nice",
        "ionice",
        "stdbuf",
        "timeout",
        "doas",
        "then",
        "do",
        "else",
        "if",
        "while",
        "until",
    }
)
SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ksh", "fish"})
# Commands that may name a secret-holding file without printing what is in it.
NAME_ONLY = frozenset(
    {
        "ls",
        "stat",
        "test",
        "[",
        "[[",
        "rm",
        "touch",
        "chmod",
        "chown",
        "mkdir",
        "file",
        "wc",
        "realpath",
        "readlink",
        "basename",
        "dirname",
        "shred",
        "unlink",
    }
)
MOVERS = frozenset({"cp", "mv", "install", "ln"})
GIT_NAME_ONLY = frozenset({"rm", "check-ignore", "ls-files", "status", "mv"})
SECRET_WORDS = frozenset(
    {
        "KEY",
        "APIKEY",
        "TOKEN",
        "SECRET",
        "SECRETS",
        "PASSWORD",
        "PASSWD",
        "PASSPHRASE",
        "CREDENTIAL",
        "CREDENTIALS",
        "PAT",
    }
)
ENV_DUMP_CODE = "|".join(
    (
        r"\bos\.environ\s*[)\]},;]",
        r"\bos\.environ\s*$",
        r"\bprint\w*\(\s*(?:dict\()?\s*os\.environ\b(?!\s*(?:\[|\.get\b))",
        r"\bos\.environ\.(?:items|copy|keys|values)\(\)",
        r"\bprocess\.env\s*[);,\]}]",
        r"\bprocess\.env\s*$",
        r"\bObject\.(?:entries|keys|values)\(\s*process\.env\b",
        r"\bENV\.(?:to_h|to_a|inspect|each|keys|values)\b",
        r"%ENV\b",
        r"\bos\.Environ\(\)",
        r"\bSystem\.getenv\(\s*\)",
        r"/proc/[^/\s]+/environ",
    )
)
# Words one of those patterns needs; a command holding none of them is not matched at all.
ENV_DUMP_WORDS = ("environ", "Environ", "process.env", "ENV", "getenv")
VAR_REF = r"\$\{?([A-Za-z_][A-Za-z0-9_]*)"


def secret_named(var: str) -> bool:
    """Whether an environment variable's name says it holds a secret (OPENAI_API_KEY)."""
    parts = set(var.upper().split("_"))
    if var.upper().endswith(("_SOCK", "_FILE", "_PATH", "_DIR", "_URL", "_ID")):
        return False
    return bool(parts & SECRET_WORDS) or var.upper().endswith(("APIKEY", "TOKEN", "SECRET", "PASSWORD"))


KEYRING_CODE = "|".join(
    (
        r"\b(?:import|from)\s+keyring\b",
        r"\bkeyring\.(?:get_password|get_credential|get_keyring)\b",
        r"\bsecretstorage\b",
        r"org\.freedesktop\.secrets|org\.freedesktop\.Secret\b",
        r"\bsecurity\s+find-(?:generic|internet)-password\b",
    )
)
KEYRING_WORDS = ("keyring", "secretstorage", "freedesktop", "security")
ASSIGNMENT = r"(?:^|[;&|\s(])([A-Za-z_][A-Za-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s;&|)]*)"
# Outloop's management commands change tenants, keys and policy: the operator's job.
OUTLOOP_MANAGEMENT = frozenset({"tenant", "workspace", "credential", "config", "import", "service", "session"})


def _substitute(command: str) -> str:
    """`x=.env; cat $x` read as `cat .env`: plain assignments in the command, expanded."""
    values: dict[str, str] = {}
    if "=" not in command:
        return command
    for m in re.finditer(ASSIGNMENT, command):
        value = m.group(2)
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        values[m.group(1)] = value
    if not values:
        return command
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), command)


def bash_refusal(command: str, cwd: Path, protected: Protected, depth: int = 0) -> str | None:
    """Why a shell command must not run (it prints a secret file or the environment), or None."""
    if any(w in command for w in ENV_DUMP_WORDS) and re.search(ENV_DUMP_CODE, command, re.M):
        return "it prints the process environment"
    if any(w in command for w in KEYRING_WORDS) and re.search(KEYRING_CODE, command):
        return "it reads the OS keyring, where Outloop keeps the keys"
    if "$" in command:
        for m in re.finditer(VAR_REF, command):
            if secret_named(m.group(1)):
                return f"it expands ${m.group(1)}, a variable named like a secret"
    expanded = _substitute(command)
    for words in _simple_commands(expanded):
        # `cd DIR && cat config.toml`: later relative paths are relative to DIR.
        if words and words[0] in ("cd", "pushd") and len(words) > 1 and not words[1].startswith("-"):
            cwd = resolve(words[1], cwd)
            continue
        why = _simple_refusal(words, cwd, protected, depth)
        if why is not None:
            return why
    return None


def _simple_commands(command: str) -> Iterable[list[str]]:
    text = command.replace("`", " ; ").replace("$(", " ; ( ").replace("<(", " ; ( ")
    for line in text.splitlines() or [""]:
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;()<>{}")
            lexer.whitespace_split = True
            lexer.commenters = ""
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: fall back to plain words
            tokens = line.split()
        current: list[str] = []
        for tok in tokens:
            if tok in CONTROL:
                if current:
                    yield current
                current = []
            else:
                current.append(tok)
        if current:
            yield current


def _simple_refusal(words: Sequence[str], cwd: Path, protected: Protected, depth: int) -> str | None:
    words = list(words)
    # Redirections: `< file` reads it; `> file` writes it (still refused into Outloop's files).
    reads: list[str] = []
    writes: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w and set(w) <= set("<>&0123456789") and ("<" in w or ">" in w):
            if i + 1 < len(words):
                (reads if "<" in w and ">" not in w else writes).append(words[i + 1])
                i += 2
                continue
        rest.append(w)
        i += 1
    for target in reads:
        kind = _path_kind(target, cwd, protected)
        if kind is not None:
            return f"it reads {target}, {kind}"
    for target in writes:
        kind = _path_kind(target, cwd, protected)
        if kind == OUTLOOP_KIND:
            return f"it writes {target}, {kind}"
    words = rest
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0], re.S):
        words = words[1:]
    while words and os.path.basename(words[0]) in WRAPPERS:
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]
    if not words:
        return None
    prog = os.path.basename(words[0])
    args = words[1:]

    if prog == "printenv":
        return "it prints the environment"
    if prog == "secret-tool" and args[:1] and args[0] in ("lookup", "search", "get"):
        return "it reads the OS keyring, where Outloop keeps the keys"
    if prog == "keyring" and any(a in ("get", "--get") for a in args):
        return "it reads the OS keyring, where Outloop keeps the keys"
    if prog.startswith("python") and "-m" in args and "keyring" in args:
        return "it reads the OS keyring, where Outloop keeps the keys"
    if prog == "outloop" and args[:1] and args[0] in OUTLOOP_MANAGEMENT:
        return f"`outloop {args[0]}` changes Outloop's tenants, keys or policy, which is the operator's job"
    why = _recursive_refusal(prog, args, cwd, protected)
    if why is not None:
        return why
    if prog == "env":
        j = 0
        while j < len(args) and (args[j].startswith("-") or "=" in args[j]):
            j += 1 + (args[j] in ("-u", "--unset", "-C", "--chdir", "-S", "--split-string"))
        if j >= len(args):
            return "it prints the environment"
        return _simple_refusal(args[j:], cwd, protected, depth)
    if prog in ("set", "export", "declare", "typeset", "compgen") and not [
        a for a in args if not a.startswith(("-", "+"))
    ]:
        if prog == "set" and args:
            return None  # `set -e`, `set -o pipefail`: options, no dump
        if prog == "compgen" and not any(a in ("-v", "-e") for a in args):
            return None
        return "it prints the environment"
    if prog in SHELLS or prog == "eval":
        inner = (
            args[args.index("-c") + 1]
            if "-c" in args and args.index("-c") + 1 < len(args)
            else (" ".join(args) if prog == "eval" else None)
        )
        if inner is not None and depth < 4:
            return bash_refusal(inner, cwd, protected, depth + 1)

    for pos, arg in enumerate(args):
        if prog in RECURSIVE_GREP and arg.startswith(("--exclude", "--exclude-dir")):
            continue  # grep --exclude='.env*' names what it will not read
        for candidate in _path_candidates(arg):
            kind = _path_kind(candidate, cwd, protected)
            if kind is None:
                continue
            if kind == OUTLOOP_KIND:
                if prog in ("ls", "stat", "test", "[", "[["):
                    continue
                return f"it touches {candidate}, {kind}"
            if prog in NAME_ONLY:
                continue
            if prog in MOVERS and pos == len(args) - 1:
                continue  # the destination: nothing is read from it
            if prog == "git" and args and args[0] in GIT_NAME_ONLY:
                continue
            return f"it reads {candidate}, {kind}"
    return None


def _path_candidates(arg: str) -> list[str]:
    out = [arg]
    if "=" in arg:  # --env-file=.env
        out.append(arg.split("=", 1)[1])
    if arg.startswith("@"):  # curl -d @.env
        out.append(arg[1:])
    if ":" in arg and not arg.startswith(("http:", "https:")):  # scp host:.env, docker -v a:b
        out.extend(part for part in arg.split(":") if part)
    return [c for c in out if c and not c.startswith("-")]


# Names a shell glob is checked against: `cat .en?` or `cat .[e]nv` reads `.env`.
GLOB_PROBES = (".env", ".envrc", ".env.local", ".env.production", ".env.development", "id_rsa", "id_ed25519")


def _path_kind(arg: str, cwd: Path, protected: Protected) -> str | None:
    if any(ch in arg for ch in "*?[{"):
        kind = classify_pattern(arg)
        if kind is not None:
            return kind
        last = PurePath(arg).name
        # A shell glob matches a leading dot only with a literal one (`*` never matches .env).
        for probe in GLOB_PROBES:
            if probe.startswith(".") and any(
                alt.startswith(".") and fnmatch(probe, alt) for alt in _brace_alternatives(last)
            ):
                return classify_name(probe)
        for match in _glob(arg, cwd):
            kind = path_kind(match, protected)
            if kind is not None:
                return kind
        base = arg.split("*")[0].split("?")[0].split("[")[0].split("{")[0]
        if base and protected.holds(resolve(base, cwd)):
            return OUTLOOP_KIND
        return None
    return path_kind(resolve(arg, cwd), protected)


def _glob(pattern: str, cwd: Path, limit: int = 200) -> list[Path]:
    """What the shell would expand `pattern` to, in `cwd` (at most `limit` paths)."""
    import glob
    import itertools

    base = resolve(pattern, cwd)
    try:
        found = itertools.islice(glob.iglob(str(base)), limit)
        return [Path(p) for p in found]
    except (OSError, ValueError):
        return []


# Commands that read whole folders: a secret file inside one is read with the rest.
RECURSIVE_GREP = frozenset({"grep", "egrep", "fgrep"})
SKIP_DIRS = frozenset({".git", "node_modules", ".venv", "venv", "__pycache__", ".tox", ".mypy_cache"})


def _secret_inside(folder: Path, protected: Protected, depth: int = 4, budget: int = 5000) -> Path | None:
    """A secret-holding file under `folder` (a bounded walk), or None."""
    stack = [(folder, 0)]
    seen = 0
    while stack:
        here, level = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > budget:
                return None
            if e.is_dir(follow_symlinks=False):
                if level + 1 < depth and e.name not in SKIP_DIRS:
                    stack.append((Path(e.path), level + 1))
            elif classify_name(e.name) is not None:
                return Path(e.path)
    return None


def _folders(args: Sequence[str], cwd: Path, default_cwd: bool) -> list[Path]:
    paths = [resolve(a, cwd) for a in args if not a.startswith("-")]
    folders = [p for p in paths if p.is_dir()]
    if not folders and default_cwd:
        folders = [cwd]
    return folders


def _recursive_refusal(prog: str, args: Sequence[str], cwd: Path, protected: Protected) -> str | None:
    """grep -r, tar, zip, find -exec and git diff over a folder that holds a secret file."""
    flags = [a for a in args if a.startswith("-")]
    joined = " ".join(args)
    if prog in RECURSIVE_GREP:
        recursive = any(f in ("-r", "-R", "--recursive", "--dereference-recursive") for f in flags) or any(
            not f.startswith("--") and ("r" in f or "R" in f) for f in flags
        )
        names_only = any(f in ("--files-with-matches", "--files-without-match", "--count") for f in flags) or any(
            not f.startswith("--") and set(f[1:]) & set("lLc") for f in flags
        )
        if not recursive or names_only or re.search(r"--exclude(?:-dir)?=['\"]?\.env", joined):
            return None
        rest = [a for a in args if not a.startswith("-")][1:]  # the first is the pattern
        folders = _folders(rest, cwd, default_cwd=True)
    elif prog in ("tar", "zip", "7z", "rsync", "scp"):
        folders = _folders(args, cwd, default_cwd=False)
    elif prog == "find" and any(a in ("-exec", "-execdir", "-ok", "-okdir") for a in args):
        named = False
        for i, a in enumerate(args[:-1]):
            if a in ("-name", "-iname", "-path", "-ipath", "-wholename"):
                named = True
                pattern = PurePath(args[i + 1]).name
                if any(fnmatch(probe, pattern) for probe in GLOB_PROBES if probe.startswith(".")):
                    return f"it runs a command on files named {args[i + 1]}, which match .env files"
        if named:
            return None  # only files of the names asked for, none of them secret
        start = [a for a in args if not a.startswith("-")][:1]
        folders = _folders(start, cwd, default_cwd=True)
    elif prog == "git" and args[:1] and args[0] in ("diff", "show", "log", "archive", "grep", "stash"):
        tracked = _tracked_secret(cwd)
        return f"it shows {tracked}, a tracked secret file" if tracked else None
    else:
        return None
    for folder in folders:
        if protected.holds(folder):
            return f"it reads {folder}, {OUTLOOP_KIND}"
        inside = _secret_inside(folder, protected)
        if inside is not None:
            return (
                f"it reads the folder {folder}, which holds {inside.name} "
                "(exclude it, e.g. grep --exclude='.env*', or list names with -l)"
            )
    return None


def _tracked_secret(cwd: Path) -> str | None:
    """A secret-named file git tracks in the repository of `cwd` (git diff would show it)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(cwd), "ls-files", "-z"], capture_output=True, timeout=3, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for name in out.decode("utf-8", "replace").split("\0"):
        if name and classify_name(PurePath(name).name) is not None:
            return name
    return None
