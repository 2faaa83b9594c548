"""Command line: inspect and verify a store.

Usage::

    python -m cache_store info PATH [--storage-options JSON] [--json]
    python -m cache_store verify PATH [--storage-options JSON]

`info` prints fingerprint, shards done/total, rows, bytes, compression and fields.
`verify` recomputes the checksum of every published shard (progress bar) and exits 1 naming
the corrupt shard(s) and arrays; exit 0 when all match, 2 when the store cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from tqdm import tqdm

from cache_store._util import format_bytes
from cache_store.errors import CorruptShard, StoreNotFound
from cache_store.reader import StoreReader
from cache_store.zarr_io import corrupt_arrays, shard_checksums

logger = logging.getLogger(__name__)


def _info(r: StoreReader, as_json: bool) -> int:
    st = r.stats()
    st["fingerprint_fields"] = r.fingerprint_fields
    st["codec"] = r.spec.codec.to_dict()
    if as_json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"store:        {st['url']}")
    print(f"fingerprint:  {st['fingerprint']}")
    print(f"fp fields:    {json.dumps(r.fingerprint_fields, sort_keys=True)}")
    print(f"shards:       {st['shards_done']}/{st['shards_total']} done ({st['shard_size']} examples per shard)")
    print(f"rows:         {st['rows']}")
    ratio = (f"{st['disk_over_raw']:.3f}x of raw, compression ratio {st['compression_ratio']:.2f}"
             if st["disk_over_raw"] and st["compression_ratio"] else "n/a")
    print(f"bytes:        {format_bytes(st['bytes_on_disk'], base=1000)} on disk, {format_bytes(st['raw_bytes'], base=1000)} raw ({ratio})")
    print(f"codec:        {json.dumps(st['codec'], sort_keys=True)}")
    print("fields:")
    for name, f in st["fields"].items():
        q = f" quant={f['quant']}" if f["quant"] else ""
        fr = f"{f['disk_over_raw']:.3f}x" if f["disk_over_raw"] is not None else "n/a"
        print(f"  {name:<14} {f['dtype']:<9} {str(tuple(f['shape'])):<22}{q:<12} {format_bytes(f['bytes'], base=1000):>10} ({fr} of raw)")
    return 0


def _verify(r: StoreReader) -> int:
    recs = r.shard_records()
    bad: dict[int, list[str]] = {}
    for sid in tqdm(sorted(recs), desc="verify", unit="shard"):
        checksum, _, per = shard_checksums(r.backend, r.spec, sid)
        if checksum != recs[sid].checksum:
            bad[sid] = corrupt_arrays(recs[sid].arrays, per)
    if bad:
        for sid, arrays in bad.items():
            print(f"CORRUPT shard {sid} (ledger/shard-{sid:06d}.json): arrays {arrays}", file=sys.stderr)
        print(f"{len(bad)} of {len(recs)} published shards are corrupt: {sorted(bad)}. Delete their ledger records "
              "and rerun the writer for them.", file=sys.stderr)
        return 1
    print(f"OK: {len(recs)} published shards match their checksums ({r.stats()['rows']} rows)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cache_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("info", "summary of a store"), ("verify", "check every published shard's checksum")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("path", help="local path or fsspec URL (s3://bucket/prefix)")
        sp.add_argument("--storage-options", default=None, help='JSON, e.g. \'{"endpoint_url": "http://..."}\'')
        if name == "info":
            sp.add_argument("--json", action="store_true", help="print stats as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    so: dict[str, Any] | None = json.loads(args.storage_options) if args.storage_options else None
    try:
        r = StoreReader(args.path, storage_options=so)
    except (StoreNotFound, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _info(r, args.json) if args.cmd == "info" else _verify(r)
    except CorruptShard as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
