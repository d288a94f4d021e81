#!/usr/bin/env python3
"""mapsnap benchmark: mapsnap dump/restore side by side with the kernel's own speed limit.

In one run and on maps of the same shape it times
  - `mapsnap dump` to a local file (one reader thread, and the default parallel dump),
  - `mapsnap restore` from that file (new pinned maps), with one filler thread and the default
    (one per CPU; the snapshot is decoded on the calling thread meanwhile),
  - the same through an S3 server when --s3-endpoint is given,
  - the C anchor's `lookup_batch` and `update_batch` loops (bench/anchors/batch_anchor.c),
  - `bpftool -j map dump`,
and prints each figure as the median of --runs runs, as a ratio to the anchor, with the
peak RSS of the process. Two shapes users compare with come after the main table:
  - a 1000-entry per-CPU hash with 8-byte keys and values (the batch benchmark of other BPF
    libraries): time of one full dump and ns per entry, mapsnap in process
    (mapsnap/benches/shapes.rs) next to the C `lookup_batch` loop;
  - a conntrack-sized LRU hash (8M slots, 40-byte keys, 56-byte values), nearly empty and
    half full: dump and restore next to the C loops.
Run as root from the repository root:

    python3 bench/bench.py                       # the full table (several minutes)
    python3 bench/bench.py --quick               # a small smoke run (CI)
    python3 bench/bench.py --markdown out.md     # also write the table as Markdown

Maps are created with bench/anchors/fill_map.c: entry i has key i and a value whose first
4 bytes are i (the rest zero), as the anchor's own maps.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PIN = Path("/sys/fs/bpf/mapsnap-bench")

# (type, value size): the shapes the performance issue names.
SHAPES = [("hash", 64), ("percpu_hash", 8), ("array", 64), ("lpm_trie", 64)]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def timed(cmd, stdout=subprocess.DEVNULL, stdin=None):
    """Runs cmd under GNU time; returns (seconds, peak RSS in MiB) of that process.

    Peak RSS comes from /usr/bin/time, not from wait4() here: a child forked from Python
    inherits the interpreter's resident set, which would set a floor under every figure.
    """
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "mapsnap-bench-rss %M", *map(str, cmd)],
                       stdout=stdout, stdin=stdin, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed:\n{p.stderr}")
    rss_kb = [int(l.split()[1]) for l in p.stderr.splitlines() if l.startswith("mapsnap-bench-rss ")]
    return secs, rss_kb[-1] / 1024.0


def build(args):
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("batch_anchor", "fill_map"):
        src = ROOT / "bench" / "anchors" / f"{name}.c"
        exe = OUT / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            sh("cc", "-O2", "-o", str(exe), str(src), "-lbpf")
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not args.mapsnap:
        sh("cargo", "build", "--release", "-q", "-p", "mapsnap", cwd=ROOT)
        args.mapsnap = str(target / "release" / "mapsnap")
    if not args.hook and "hook" in args.parts:
        sh("cargo", "build", "--release", "-q", "-p", "mapsnap-hook", cwd=ROOT)
        args.hook = str(target / "release" / "mapsnap-hook")


def reset_dir(d):
    if d.exists():
        shutil.rmtree(d)
        # The kernel frees an unpinned map from a worker after its last reference goes (a
        # 1M-entry hash map: all its elements). Let that finish before the next timed command,
        # which would otherwise share the CPUs with it; the C anchor never pays for it either.
        time.sleep(1.0)
    d.mkdir(parents=True)


def fill(path, n, vs, t, ks=4, max_entries=None):
    sh(str(OUT / "fill_map"), str(path), str(n), str(vs), t, str(ks), str(max_entries or n))


def anchor(n, vs, t, ks=4, max_entries=None, dumps=1):
    cmd = [str(OUT / "batch_anchor"), str(n), str(vs), t, "4096"]
    if t != "lpm_trie":
        cmd += [str(ks), str(max_entries or n), str(dumps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ops = {}
    for line in out.splitlines():
        rec = json.loads(line)
        ops[rec["op"]] = rec["seconds"]
    return ops


class Row:
    def __init__(self, shape, n, op, secs, rss, anchor_secs=None, extra=""):
        self.shape, self.n, self.op = shape, n, op
        self.secs, self.rss, self.anchor, self.extra = secs, rss, anchor_secs, extra

    def ratio(self):
        return self.secs / self.anchor if self.anchor else None


def median(xs):
    return statistics.median(xs)


def bench_shape(args, t, vs, n, rows, s3, ks=None, max_entries=None, shape=None, runs=None):
    ks = ks or (8 if t == "lpm_trie" else 4)
    runs = runs or args.runs
    src = PIN / f"{t}_{n}"
    reset_dir(src)
    fill(src / "m", n, vs, t, ks, max_entries)
    snap = OUT / f"{t}_{n}.mapsnap"
    anchors = [anchor(n, vs, t, ks, max_entries) for _ in range(runs)]
    look = median([a["lookup_batch"] for a in anchors])
    upd = median([a["update_batch"] for a in anchors])
    create = median([a["create"] for a in anchors])
    shape = shape or f"{t} ({ks}-byte key, {vs}-byte value)"
    rows.append(Row(shape, n, "anchor lookup_batch", look, None))
    rows.append(Row(shape, n, "anchor update_batch", upd, None))
    rows.append(Row(shape, n, "anchor create + update_batch", create + upd, None))
    for label, threads in (("dump, 1 thread", 1), ("dump, parallel", os.cpu_count() or 2)):
        res = [timed([args.mapsnap, "dump", "--pin", str(src / "m"), "-o", str(snap),
                      "--overwrite", "--threads", str(threads)]) for _ in range(runs)]
        rows.append(Row(shape, n, label, median([r[0] for r in res]),
                        max(r[1] for r in res), look))
    size = snap.stat().st_size
    raw = n * (ks + vs)
    if t == "percpu_hash":
        raw = n * (ks + ((vs + 7) // 8 * 8) * possible_cpus())
    dst = PIN / f"{t}_{n}_restored"
    for label, threads in (("restore, 1 filler", ["--threads", "1"]), ("restore", [])):
        res = []
        for _ in range(runs):
            reset_dir(dst)
            res.append(timed([args.mapsnap, "restore", str(snap), "--pin-root", str(dst), *threads]))
        restore_secs = median([r[0] for r in res])
        extra = f"{restore_secs / (create + upd):.2f} x anchor create + update_batch"
        if not threads:
            extra += f"; snapshot {size / 2**20:.1f} MiB = {100 * size / raw:.1f}% of raw {raw / 2**20:.1f} MiB"
        rows.append(Row(shape, n, label, restore_secs, max(r[1] for r in res), upd, extra))
    if s3:
        key = f"{s3}/{t}_{n}.mapsnap"
        res = [timed([args.mapsnap, "dump", "--pin", str(src / "m"), "-o", key, "--overwrite"])
               for _ in range(args.runs)]
        rows.append(Row(shape, n, "dump to S3", median([r[0] for r in res]), max(r[1] for r in res), look))
        res = []
        for _ in range(args.runs):
            reset_dir(dst)
            res.append(timed([args.mapsnap, "restore", key, "--pin-root", str(dst)]))
        rows.append(Row(shape, n, "restore from S3", median([r[0] for r in res]), max(r[1] for r in res), upd))
    if n <= args.bpftool_max:
        res = [timed(["bpftool", "-j", "map", "dump", "pinned", str(src / "m")])
               for _ in range(min(args.runs, 3))]
        rows.append(Row(shape, n, "bpftool -j map dump", median([r[0] for r in res]),
                        max(r[1] for r in res), look))
    shutil.rmtree(src)
    shutil.rmtree(dst, ignore_errors=True)
    snap.unlink()


def bench_multi(args, count, n, rows):
    src = PIN / f"multi_{count}x{n}"
    reset_dir(src)
    for i in range(count):
        fill(src / f"m{i}", n, 64, "hash")
    snap = OUT / "multi.mapsnap"
    anchors = [anchor(n, 64, "hash") for _ in range(args.runs)]
    look = count * median([a["lookup_batch"] for a in anchors])
    upd = count * median([a["update_batch"] for a in anchors])
    shape = f"{count} hash maps of {n} (64-byte values)"
    rows.append(Row(shape, count * n, f"anchor lookup_batch x{count}", look, None))
    rows.append(Row(shape, count * n, f"anchor update_batch x{count}", upd, None))
    res = [timed([args.mapsnap, "dump", "--pin", str(src), "-o", str(snap), "--overwrite"])
           for _ in range(args.runs)]
    rows.append(Row(shape, count * n, "dump, parallel", median([r[0] for r in res]), max(r[1] for r in res), look))
    dst = PIN / "multi_restored"
    for label, threads in (("restore, 1 filler", ["--threads", "1"]), ("restore", [])):
        res = []
        for _ in range(args.runs):
            reset_dir(dst)
            res.append(timed([args.mapsnap, "restore", str(snap), "--pin-root", str(dst), *threads]))
        rows.append(Row(shape, count * n, label, median([r[0] for r in res]), max(r[1] for r in res), upd))
    shutil.rmtree(src)
    shutil.rmtree(dst, ignore_errors=True)
    snap.unlink()


def bench_hook(args, rows, count, n):
    """The OCI hook's createRuntime restore next to `mapsnap restore` of the same snapshot.

    The hook runs as a runtime would run it (state on stdin, a bundle whose config.json
    bind-mounts a bpffs directory at /sys/fs/bpf and the snapshot's directory at /data), so
    the figure includes its config, annotation and mount checks and its own publish step.
    """
    work = OUT / "hook"
    src = PIN / "hook_src"
    reset_dir(src)
    (src / "sys" / "fs" / "bpf").mkdir(parents=True)
    for i in range(count):
        fill(src / "sys" / "fs" / "bpf" / f"m{i}", n, 64, "hash")
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    (work / "bundle" / "rootfs").mkdir(parents=True)
    snap = work / "data" / "app.mapsnap"
    sh(args.mapsnap, "dump", "--pin", str(src), "-o", str(snap), "--overwrite", stdout=subprocess.DEVNULL)
    shutil.rmtree(src)
    dst = PIN / "hook_dst"
    (work / "hook.toml").write_text(
        "[hook]\n"
        f'log_file = "{work / "hook.log"}"\ndeadline = "5m"\nwait_timeout = "3s"\n'
        f'state_dir = "{work / "state"}"\nrequest_dir = "{work / "requests"}"\n'
        f'restore_request_dir = "{work / "restores"}"\n')
    (work / "bundle" / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/sys/fs/bpf", "type": "bind", "source": str(dst), "options": ["rbind"]},
            {"destination": "/data", "type": "bind", "source": str(work / "data"), "options": ["rbind"]},
        ],
        "annotations": {"mapsnap.io/restore-from": "/data/app.mapsnap"},
    }))
    shape = f"{count} hash map{'s' if count > 1 else ''} of {n:,} (64-byte values)"
    cli, hook = [], []
    for i in range(args.runs):
        reset_dir(dst)
        cli.append(timed([args.mapsnap, "restore", str(snap), "--pin-root", str(dst)]))
        reset_dir(dst)
        # A new container each time: the hook restores a snapshot once per container.
        state_file = work / "state.json"
        state_file.write_text(json.dumps({"ociVersion": "1.0.2", "id": f"bench-{count}-{i}",
                                          "status": "created", "bundle": str(work / "bundle")}))
        with open(state_file) as stdin:
            hook.append(timed([args.hook, "--config", str(work / "hook.toml"), "oci", "createRuntime"],
                              stdin=stdin))
        if not (dst / "m0").exists():
            sys.exit(f"bench: the hook restored nothing; see {work / 'hook.log'}")
    c = median([r[0] for r in cli])
    rows.append(Row(shape, count * n, "restore (CLI)", c, max(r[1] for r in cli), None))
    h = median([r[0] for r in hook])
    rows.append(Row(shape, count * n, "createRuntime hook restore", h, max(r[1] for r in hook), None,
                    f"{h / c:.2f} x the CLI's restore"))
    shutil.rmtree(dst, ignore_errors=True)


def bench_small_percpu(args):
    """One full dump of a 1000-entry per-CPU hash (8-byte keys and values), in process."""
    n, dumps = 1000, 2000
    c = anchor(n, 8, "percpu_hash", 8, n, dumps)
    lines = [("C libbpf lookup_batch loop", c["lookup_batch"])]
    out = subprocess.run(["cargo", "bench", "-q", "-p", "mapsnap", "--bench", "shapes", "--",
                          str(n), str(dumps)], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            lines.append((rec["op"], rec["seconds_per_dump"]))
    src = PIN / "small_percpu"
    reset_dir(src)
    fill(src / "m", n, 8, "percpu_hash", 8)
    snap = OUT / "small_percpu.mapsnap"
    res = [timed([args.mapsnap, "dump", "--pin", str(src / "m"), "-o", str(snap), "--overwrite"])
           for _ in range(args.runs)]
    lines.append(("mapsnap dump (CLI process, to a file)", median([r[0] for r in res])))
    shutil.rmtree(src)
    snap.unlink()
    head = ["| per-CPU hash, 1000 entries, 8-byte keys and values | one full dump | ns per entry | x C loop |",
            "| --- | ---: | ---: | ---: |"]
    for op, secs in lines:
        head.append(f"| {op} | {secs * 1e6:.1f} us | {secs * 1e9 / n:.0f} | {secs / lines[0][1]:.2f} |")
    return "\n".join(head)


def possible_cpus():
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return max(int(p.split("-")[-1]) for p in text.split(",")) + 1


def table(rows):
    head = "| map | entries | operation | median s | x anchor | peak RSS MiB | notes |"
    lines = [head, "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = f"{r.ratio():.2f}" if r.ratio() is not None else ""
        rss = f"{r.rss:.1f}" if r.rss is not None else ""
        lines.append(f"| {r.shape} | {r.n:,} | {r.op} | {r.secs:.3f} | {ratio} | {rss} | {r.extra} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--multi", default="8x100000", help="COUNTxENTRIES hash maps dumped at once ('' to skip)")
    ap.add_argument("--bpftool-max", type=int, default=1000000, help="largest map bpftool dumps")
    ap.add_argument("--s3", default="", help="s3://bucket/prefix to also time dump/restore through S3")
    ap.add_argument("--mapsnap", default="", help="mapsnap binary (default: build target/release/mapsnap)")
    ap.add_argument("--quick", action="store_true", help="10K entries, 1 run, hash and array only")
    ap.add_argument("--markdown", default="", help="also write the table to this file")
    ap.add_argument("--hook", default="", help="mapsnap-hook binary (default: build target/release/mapsnap-hook)")
    ap.add_argument("--only", default="", help="comma-separated parts to run: main,multi,hook,small,conntrack (default: all)")
    ap.add_argument("--conntrack", default="10000,4194304", help="entries in the 8M-slot LRU ('' to skip)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (it creates and pins BPF maps)")
    shapes = SHAPES
    parts = set((args.only or "main,multi,hook,small,conntrack").split(","))
    args.parts = parts
    if args.quick:
        args.sizes, args.runs, args.multi = "10000", 1, "2x10000"
        shapes = [("hash", 64), ("array", 64)]
        # The in-process shape and the hook need cargo builds of their own: not in the
        # smoke run unless the hook binary is given.
        parts.discard("small")
        if not args.hook:
            parts.discard("hook")
        args.conntrack = "1000"
    build(args)
    PIN.mkdir(parents=True, exist_ok=True)
    rows = []
    if "main" in parts:
        for t, vs in shapes:
            for n in [int(s) for s in args.sizes.split(",") if s]:
                bench_shape(args, t, vs, n, rows, args.s3)
                print(f"bench: {t} {n} done", file=sys.stderr)
    if args.multi and "multi" in parts:
        count, n = (int(x) for x in args.multi.split("x"))
        bench_multi(args, count, n, rows)
    if "hook" in parts:
        for count, n in ((1, 10000),) if args.quick else ((1, 1000000), (8, 100000)):
            bench_hook(args, rows, count, n)
        print("bench: hook done", file=sys.stderr)
    if "conntrack" in parts:
        slots = 4096 if args.quick else 8 << 20
        for n in [int(s) for s in args.conntrack.split(",") if s]:
            # Sized like a conntrack table: a few runs only, each map takes about 1 GiB.
            bench_shape(args, "lru_hash", 56, n, rows, "", ks=40, max_entries=slots,
                        shape=f"conntrack lru_hash ({slots:,} slots, 40-byte key, 56-byte value)",
                        runs=min(args.runs, 3))
            print(f"bench: conntrack {n} done", file=sys.stderr)
    out = table(rows)
    if "small" in parts:
        out += "\n\n" + bench_small_percpu(args)
    print(out)
    if args.markdown:
        Path(args.markdown).write_text(out + "\n")


if __name__ == "__main__":
    main()
