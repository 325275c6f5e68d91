#!/usr/bin/env python3
"""Writes a seed corpus and a dictionary for the spore_reader fuzz target.

Signed-mode seeds: u16 LE manifest length, manifest JSON, payload (raw or one zstd frame,
compressed with the `zstd` CLI when present). Valid manifests with matching hashes let the
fuzzer start past validation and into streaming. Raw-mode seeds: a spore header with a
manifest and a junk signature (reaches inspect_unverified's JSON parsing).

Usage: cd fuzz && python3 gen_seeds.py   (writes corpus/spore_reader/ and spore_reader.dict)
"""
import hashlib
import json
import os
import shutil
import struct
import subprocess

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "spore_reader")
MAGIC = b"\x89SPORE\r\n"


def zstd(data: bytes, *args: str) -> bytes | None:
    if shutil.which("zstd") is None:
        return None
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, check=True,
                          capture_output=True).stdout


def manifest(files, compression="none", **extra):
    m = {
        "name": "hello",
        "version": "1.0.0",
        "command": "./" + files[0][0],
        "created_at": "2026-11-23T10:00:00Z",
        "compression": compression,
        "files": [
            {"path": p, "size": len(d), "mode": mode,
             "sha256": "sha256:" + hashlib.sha256(d).hexdigest()}
            for p, d, mode in files
        ],
    }
    m.update(extra)
    return json.dumps(m, separators=(",", ":")).encode()


def signed(man: bytes, payload: bytes) -> bytes:
    return struct.pack("<H", len(man)) + man + payload


def raw_spore(man: bytes, payload: bytes) -> bytes:
    return (MAGIC + struct.pack("<HHI", 1, 0, len(man)) + b"\x11" * 8 + b"\x22" * 64
            + man + payload)


def main():
    os.makedirs(OUT, exist_ok=True)
    seeds = {}
    one = [("hello", b"#!/bin/sh\necho hi\n", 0o755)]
    two = [("bin/app", b"\x7fELF" + b"A" * 40, 0o100755), ("share/d.txt", b"data", 0o644)]
    empty = [("run", b"", 0o755)]
    full_extra = dict(
        args=["--serve", "x"], env={"RUST_LOG": "info", "A_1": ""},
        nutrients={"cpu_milli": 500, "memory_mb": 64, "pids": 16},
        slo={"health_path": "/healthz", "warmup_ms": 0, "interval_ms": 10, "timeout_ms": 10,
             "min_healthy_ms": 0, "stop_grace_ms": 0},
        security={"user": "mesh-spore", "capabilities": ["CAP_NET_BIND_SERVICE"]},
    )
    for name, files, extra in [("one", one, {}), ("two", two, {}), ("empty", empty, {}),
                               ("full", two, full_extra)]:
        content = b"".join(d for _, d, _ in files)
        m = manifest(files, "none", **extra)
        seeds[f"signed_raw_{name}"] = signed(m, content)
        seeds[f"spore_raw_{name}"] = raw_spore(m, content)
        z = zstd(content)
        if z is not None:
            mz = manifest(files, "zstd", **extra)
            seeds[f"signed_zstd_{name}"] = signed(mz, z)
            seeds[f"signed_zstd_nocs_{name}"] = signed(mz, zstd(content, "--no-check"))
            seeds[f"signed_zstd_trailing_{name}"] = signed(mz, z + z)
        seeds[f"signed_trailing_{name}"] = signed(m, content + b"X")
        seeds[f"signed_short_{name}"] = signed(m, content[:-1])
    # A larger, compressible file so that zstd blocks of several kinds appear.
    big = [("big", (b"abcdefgh" * 512) + bytes(range(256)) * 4, 0o755)]
    cb = b"".join(d for _, d, _ in big)
    z = zstd(cb, "-19")
    if z is not None:
        seeds["signed_zstd_big"] = signed(manifest(big, "zstd"), z)
    seeds["signed_raw_big"] = signed(manifest(big, "none"), cb)
    for k, v in seeds.items():
        with open(os.path.join(OUT, k), "wb") as f:
            f.write(v)

    words = [b'"name"', b'"version"', b'"command"', b'"args"', b'"env"', b'"nutrients"',
             b'"slo"', b'"security"', b'"created_at"', b'"compression"', b'"files"',
             b'"path"', b'"size"', b'"mode"', b'"sha256"', b'"none"', b'"zstd"',
             b'"cpu_milli"', b'"memory_mb"', b'"pids"', b'"health_path"', b'"warmup_ms"',
             b'"interval_ms"', b'"timeout_ms"', b'"min_healthy_ms"', b'"stop_grace_ms"',
             b'"user"', b'"capabilities"', b"sha256:", b"CAP_", b"PORT", b"./", b"..",
             b"/", b"\\", b"null", b"true", b"1.0.0-rc.1+b", b"2026-11-23T10:00:00Z",
             MAGIC, b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18", b"mycelium-spore-v1\x00",
             b"18446744073709551615", b"17179869184", b"4294967295", b"0o755", b"\\u0000"]
    with open(os.path.join(os.path.dirname(OUT), "..", "spore_reader.dict"), "w") as f:
        for w in words:
            f.write('"' + "".join(chr(b) if 0x20 <= b < 0x7f and b not in (0x22, 0x5c)
                                  else f"\\x{b:02x}" for b in w) + '"\n')
    print(f"{len(seeds)} seeds in {OUT}")


if __name__ == "__main__":
    main()
