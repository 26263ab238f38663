"""`opscore auth`: manage the auth file (principals, roles, key hashes) locally.

These commands edit the file; they talk to no server. A running server takes the
change on SIGHUP (`kill -HUP <pid>`): revoked principals' streams end then.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from opscore.errors import ConfigError
from opscore.security import authfile, keys
from opscore.security.roles import Role

_FILE = click.option(
    "--file",
    "path",
    envvar="OPSCORE_AUTH_FILE",
    show_envvar=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="The auth file (.toml, .yaml or .yml), as given to `opscore serve --auth-file`.",
)
_RELOAD_HINT = "send the server SIGHUP (kill -HUP <pid>) to apply the change"


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _load(path: str) -> list[authfile.Entry]:
    try:
        return authfile.load_or_empty(path)
    except ConfigError as exc:
        _fail(str(exc))


def _save(path: str, entries: list[authfile.Entry]) -> None:
    try:
        authfile.save(path, entries)
    except (ConfigError, OSError) as exc:
        _fail(f"cannot write {path}: {exc}")


@click.group()
def auth() -> None:
    """Principals and API keys in the auth file (see docs/security.md)."""


@auth.command("create-key")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    help="Role of a new principal (required unless --name names an existing one).",
)
@click.option(
    "--agents",
    multiple=True,
    metavar="PATTERN",
    help="Agent ids the principal may act as (role agent; glob, repeatable): 'summarizer-*'.",
)
@click.option(
    "--name", help="Principal name; an existing one gets a second key (rotation). [default: new]"
)
@click.option("--subject", help="Also accept this mTLS client certificate subject.")
@_FILE
def create_key(
    role: str | None, agents: tuple[str, ...], name: str | None, subject: str | None, path: str
) -> None:
    """Make a new API key, store its hash and print the key (once: it is not kept).

    \b
      opscore auth create-key --role agent --agents 'summarizer-*' --file auth.toml
    """
    entries = _load(path)
    key = keys.generate_key()
    key_hash = keys.hash_key(key)
    existing = next((e for e in entries if e.name == name), None)
    if existing is not None:
        if role is not None and role != existing.role.value:
            _fail(f"principal {name!r} has role {existing.role}; revoke it to change its role")
        if agents and tuple(agents) != existing.agents:
            _fail(f"principal {name!r} is allowed {existing.agents}; revoke it to change that")
        if subject is not None and subject != existing.subject:
            _fail(f"principal {name!r} has subject {existing.subject!r}")
        entries = [e.with_key(key_hash) if e is existing else e for e in entries]
    else:
        if role is None:
            _fail("--role is required for a new principal")
        name = name or f"{role}-{secrets.token_hex(3)}"
        try:
            entry = authfile.parse(
                {
                    "principals": [
                        {
                            "name": name,
                            "role": role,
                            **({"agents": list(agents)} if agents else {}),
                            **({"subject": subject} if subject else {}),
                            "key_hashes": [key_hash],
                        }
                    ]
                },
                "new principal",
            )[0]
        except ConfigError as exc:
            _fail(str(exc))
        entries = [*entries, entry]
    _save(path, entries)
    click.echo(key)
    click.echo(
        f"Stored the hash of a new key for principal {name!r} in {path}. The key above is "
        f"shown only now. Then {_RELOAD_HINT}.",
        err=True,
    )


@auth.command("list")
@_FILE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_principals(path: str, as_json: bool) -> None:
    """Show the principals: names, roles, allowances, subjects, key fingerprints.
    Never keys (the file holds none)."""
    entries = _load(path)
    rows: list[dict[str, Any]] = [
        {
            "name": e.name,
            "role": e.role.value,
            "agents": list(e.agents) if e.agents is not None else None,
            "subject": e.subject,
            "keys": [keys.fingerprint(h) for h in e.key_hashes],
        }
        for e in entries
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(header_style="bold", box=None, pad_edge=False)
    for column in ("NAME", "ROLE", "AGENTS", "SUBJECT", "KEYS"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["role"],
            ", ".join(r["agents"]) if r["agents"] is not None else "-",
            r["subject"] or "-",
            ", ".join(r["keys"]) or "-",
        )
    Console(highlight=False).print(table)


@auth.command()
@click.argument("name")
@click.option(
    "--key",
    "fingerprint",
    metavar="FINGERPRINT",
    help="Revoke only this key (as `opscore auth list` shows it), keeping the principal.",
)
@_FILE
def revoke(name: str, fingerprint: str | None, path: str) -> None:
    """Remove principal NAME (or one of its keys) from the auth file."""
    entries = _load(path)
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        _fail(f"no principal named {name!r} in {path}")
    if fingerprint is None:
        kept = [e for e in entries if e is not entry]
        what = f"principal {name!r}"
    else:
        hashes = tuple(h for h in entry.key_hashes if keys.fingerprint(h) != fingerprint)
        if len(hashes) == len(entry.key_hashes):
            _fail(f"principal {name!r} has no key {fingerprint!r}")
        if not hashes and entry.subject is None:
            _fail(f"{fingerprint} is the last key of {name!r}: revoke the principal instead")
        replaced = authfile.Entry(entry.name, entry.role, entry.agents, entry.subject, hashes)
        kept = [replaced if e is entry else e for e in entries]
        what = f"key {fingerprint} of principal {name!r}"
    _save(path, kept)
    click.echo(f"Revoked {what}; {_RELOAD_HINT}.", err=True)
