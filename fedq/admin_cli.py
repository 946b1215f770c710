"""Operator commands: ``fedq dead-letters`` (over the REST API) and ``fedq replay``.

Only argument parsing lives here, so that ``fedq --help`` stays fast; ``replay``
loads its numeric code when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from fedq.config import EnvReader

__all__ = ["add_dead_letters_parser", "add_replay_parser", "run_dead_letters"]

DEFAULT_API = "http://127.0.0.1:8080"
TIMEOUT_S = 30.0


class _ApiCallError(RuntimeError):
    """The API refused the call or could not be reached."""


def add_dead_letters_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedq dead-letters list|show|requeue|purge``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api", default=None, help=f"REST API URL (env FEDQ_API_URL, {DEFAULT_API})"
    )
    common.add_argument("--admin-token", default=None, help="admin token (env FEDQ_ADMIN_TOKEN)")

    parser = sub.add_parser("dead-letters", help="inspect and recover dead-lettered updates")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=100)
    show = actions.add_parser("show", parents=[common], help="one dead letter in full")
    show.add_argument("id")
    for name, text in (("requeue", "send back to the workers"), ("purge", "delete for good")):
        action = actions.add_parser(name, parents=[common], help=f"{text} (admin token)")
        action.add_argument("ids", nargs="*", help="dead-letter ids")
        action.add_argument("--all", action="store_true", help="every dead letter")
    parser.set_defaults(handler=run_dead_letters)


def add_replay_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedq replay``."""
    parser = sub.add_parser("replay", help="re-aggregate a finished round from the archive")
    parser.add_argument("--round", dest="round_id", type=int, required=True)
    parser.add_argument("--rule", default="fedavg", choices=("fedavg", "median", "trimmed-mean"))
    parser.add_argument("--trim", type=float, default=0.1, help="fraction cut at each end")
    parser.add_argument("--redis-url", default=None, help="Redis URL (env FEDQ_REDIS_URL)")
    parser.add_argument(
        "--amqp-url", default=None, help="RabbitMQ URL (env FEDQ_AMQP_URL); none: FEDQ_ARCHIVE_DIR"
    )
    parser.add_argument("--idle-s", type=float, default=1.0, help="stream read idle timeout")
    parser.set_defaults(handler=_replay)


async def _replay(args: argparse.Namespace) -> int:
    from fedq.replay import run_replay_command

    return await run_replay_command(args)


async def run_dead_letters(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run one ``dead-letters`` action; 0 on success, 1 when the API refused, 2 on bad use."""
    out = out or sys.stdout
    env = EnvReader()
    api = (args.api or env.str("API_URL", DEFAULT_API)).rstrip("/")
    token = args.admin_token or env.str("ADMIN_TOKEN", "")

    try:
        if args.action == "list":
            body = await _call("GET", f"{api}/v1/dead-letters?limit={args.limit}")
            _print_table(body["dead_letters"], out)
        elif args.action == "show":
            letter = urllib.request.quote(args.id, safe="")
            body = await _call("GET", f"{api}/v1/dead-letters/{letter}")
            print(json.dumps(body, indent=2), file=out)
        else:
            return await _settle(args, api=api, token=token, out=out)
    except _ApiCallError as exc:
        print(f"fedq: dead-letters {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _settle(args: argparse.Namespace, *, api: str, token: str, out: TextIO) -> int:
    if bool(args.ids) == bool(args.all):
        print(f"fedq: dead-letters {args.action}: name ids or give --all", file=sys.stderr)
        return 2
    payload = {"all": True} if args.all else {"ids": args.ids}

    body = await _call("POST", f"{api}/v1/dead-letters/{args.action}", payload=payload, token=token)
    done = body.get("requeued", body.get("purged", []))
    verb = "requeued" if args.action == "requeue" else "purged"
    print(f"{verb} {len(done)}: {', '.join(done) or '-'}", file=out)
    if body.get("missing"):
        print(f"not found: {', '.join(body['missing'])}", file=out)
    return 0


async def _call(
    method: str, url: str, *, payload: dict[str, Any] | None = None, token: str = ""
) -> dict[str, Any]:
    return await asyncio.to_thread(_call_blocking, method, url, payload, token)


def _call_blocking(
    method: str, url: str, payload: dict[str, Any] | None, token: str
) -> dict[str, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")

    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise _ApiCallError(f"HTTP {exc.code}: {_error_text(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _ApiCallError(f"cannot reach the API at {url}: {exc}") from exc


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", exc.reason))
    except (ValueError, AttributeError):
        return str(exc.reason)


def _print_table(letters: list[dict[str, Any]], out: TextIO) -> None:
    if not letters:
        print("no dead letters", file=out)
        return
    print(f"{'id':<36} {'round':>5} {'client':<16} {'size':>9} {'when':<19}  reason", file=out)
    for d in letters:
        when = (
            datetime.datetime.fromtimestamp(d["when"]).strftime("%Y-%m-%d %H:%M:%S")
            if d.get("when")
            else "-"
        )
        print(
            f"{d['id']:<36} {d.get('round') or '-':>5} {d.get('client') or '-':<16} "
            f"{d.get('size', 0):>9} {when:<19}  {d.get('reason', '')}",
            file=out,
        )
