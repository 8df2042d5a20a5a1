# -*- test-case-name: tests.integration.test_cli_commands -*-
"""The key and settings commands: keygen, pubkey, config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dsss.client.commands.common import PROG, add_command
from dsss.client.config import Settings
from dsss.client.render import dump_json
from dsss.crypto.keys import generate_key_file, load_key_file, public_key_hex


def register(sub: Any) -> None:
    add_command(sub, "keygen", "create a new key pair in the key file", f"""examples:
  {PROG} keygen                         # ~/.config/dsss/key, prints the public key
  {PROG} --key ~/work.key keygen
  DSSS_KEY=~/work.key {PROG} keygen

An existing key file is never overwritten (exit code 2).
""").set_defaults(func=cmd_keygen)
    add_command(sub, "pubkey", "print your public key (give it to people who share files with you)", f"""examples:
  {PROG} pubkey > me.pub
  {PROG} --key ~/work.key pubkey
""").set_defaults(func=cmd_pubkey)
    add_command(sub, "config", "show the settings in force and where each one comes from", f"""examples:
  {PROG} config
  DSSS_CONFIG=./test.toml {PROG} --json config
""").set_defaults(func=cmd_config)


async def cmd_keygen(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    key = generate_key_file(settings.key)
    if args.json:
        dump_json({"public-key": public_key_hex(key), "key-file": str(settings.key)})
    else:
        print(public_key_hex(key))
        print(f"wrote {settings.key}", file=sys.stderr)
    return 0


async def cmd_pubkey(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    key = load_key_file(settings.key)
    if args.json:
        dump_json({"public-key": public_key_hex(key), "key-file": str(settings.key)})
    else:
        print(public_key_hex(key))
    return 0


async def cmd_config(reactor: Any, args: argparse.Namespace, settings: Settings) -> int:
    values = {
        "server": settings.server,
        "key": str(settings.key),
        "part-size": settings.part_size,
        "parallel": settings.parallel,
        "erasure": str(settings.erasure) if settings.erasure is not None else "off",
    }
    if args.json:
        dump_json({**values, "config-file": str(settings.config_file) if settings.config_file else None,
                   "sources": settings.sources})
        return 0
    for name, value in values.items():
        print(f"{name:<9} = {value}  ({settings.sources[name]})")
    print(f"config file: {settings.config_file or 'none'}")
    return 0
