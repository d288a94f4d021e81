#!/usr/bin/env python3
"""mapsnap downtime benchmark: what a checkpoint and a restore cost a container, with a real
engine (Podman + runc + CRIU), with and without mapsnap.

For maps pinned in a container's bind-mounted bpffs directory (mapsnap-hook as CRIU's
post-dump action script and createRuntime hook) and maps a container process holds by fd
(the CRIU plugin), of 10K / 100K / 1M entries (hash, LRU hash, per-CPU hash, array), it
measures
  - CRIU's frozen_time and the whole checkpoint (`podman container checkpoint --export
    --print-stats`), and
  - the restore (`podman container restore --import --print-stats`),
with mapsnap installed and without (CRIU alone: the same container, or for maps held by fd
the same process holding no map, since CRIU alone cannot checkpoint a BPF map fd), as medians
of --runs runs, next to the single-thread `lookup_batch` loop of the same map
(bench/anchors/batch_anchor.c), and the peak RSS of the hook, its detached finisher and the
criu process running the plugin. Run as root from the repository root (`make bench-downtime`):

    python3 bench/downtime.py                  # the full table (tens of minutes)
    python3 bench/downtime.py --quick          # 1 run, small maps (the CI smoke run)
    python3 bench/downtime.py --markdown out.md

Nothing of the machine's own CRIU or hooks setup is used or changed: `mapsnap-hook install`
writes hooks.d files, the CRIU config and the plugin under a private root, each container
names its CRIU config with the `org.criu.config` annotation, and Podman runs with a private
storage root.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = Path("/var/tmp/mapsnap-downtime")
BPF = Path("/sys/fs/bpf/mapsnap-downtime")

# (type, value size): the throughput benchmark's shapes.
SHAPES = [("hash", 64), ("lru_hash", 64), ("percpu_hash", 8), ("array", 64)]
SIZES = [10_000, 100_000, 1_000_000]

# The pinned-map variants: where post-dump puts the maps and when it reads them.
#   image:  into CRIU's image directory, read and compressed inside the freeze (no request)
#   frozen: read inside the freeze into a spool; copied to the destination after it
#   after:  post-dump only opens the maps; a detached process reads them after the freeze
PINNED_VARIANTS = ["image", "frozen", "after"]

# --keep-logs: where each checkpoint's CRIU dump.log is copied (None: not kept).
KEEP_LOGS = None


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def out_of(*cmd):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"downtime: {' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr}")
    return p.stdout


def target_dir():
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def build(args):
    OUT.mkdir(parents=True, exist_ok=True)
    for name, flags in (("batch_anchor", ["-lbpf"]), ("fill_map", ["-lbpf"])):
        src = ROOT / "bench" / "anchors" / f"{name}.c"
        exe = OUT / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            sh("cc", "-O2", "-o", exe, src, *flags)
    src = ROOT / "bench" / "downtime" / "holdmap.c"
    exe = OUT / "holdmap"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        sh("cc", "-O2", "-static", "-o", exe, src)
    # Two cargo runs: built together, the plugin would get the CLI's object-storage feature.
    if not args.hook:
        sh("cargo", "build", "--release", "-q", "-p", "mapsnap-hook", cwd=ROOT)
        args.hook = str(target_dir() / "release" / "mapsnap-hook")
    if not args.plugin:
        sh("cargo", "build", "--release", "-q", "-p", "mapsnap-criu", "--lib", cwd=ROOT)
        args.plugin = str(target_dir() / "release" / "libmapsnap_criu.so")
    if not args.cli:
        sh("cargo", "build", "--release", "-q", "-p", "mapsnap", "--bin", "mapsnap", cwd=ROOT)
        args.cli = str(target_dir() / "release" / "mapsnap")


class Podman:
    """Podman with a private storage root, run root and tmp dir (the machine's stay untouched)."""

    def __init__(self, base):
        self.base = base
        self.dirs = [base / "root", base / "run", base / "tmp"]

    def cmd(self, hooks_dir, *args):
        return ["podman", "--root", self.dirs[0], "--runroot", self.dirs[1], "--tmpdir",
                self.dirs[2], "--hooks-dir", hooks_dir, "--cgroup-manager=cgroupfs",
                "--events-backend=file", *args]

    def reset(self):
        if self.dirs[0].exists():
            subprocess.run([str(c) for c in self.cmd("/nonexistent", "rm", "--all", "--force",
                                                     "--time", "0")], capture_output=True)
            subprocess.run([str(c) for c in self.cmd("/nonexistent", "system", "reset",
                                                     "--force")], capture_output=True)
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)


def mount_bpffs():
    mounts = Path("/proc/mounts").read_text()
    if not any(l.split()[1:3] == ["/sys/fs/bpf", "bpf"] for l in mounts.splitlines()):
        sh("mount", "-t", "bpf", "bpf", "/sys/fs/bpf")


def clear_dir(d):
    if d.exists():
        for e in d.iterdir():
            if e.is_dir() and not e.is_symlink():
                clear_dir(e)
                e.rmdir()
            else:
                e.unlink()
    d.mkdir(parents=True, exist_ok=True)


def setup(args):
    """The private mapsnap install (hook configs, CRIU configs, hooks.d) and the image."""
    pod = Podman(WORK / "podman")
    pod.reset()
    for d in ("host", "state", "requests", "snapshots", "hook-state", "archives", "empty",
              "plugin-snapshots"):
        p = WORK / d
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)
    mount_bpffs()
    clear_dir(BPF)
    # `mapsnap restore` of the plugin's snapshots reads no host config.
    (WORK / "empty.toml").write_text("")
    host = WORK / "host"
    configs = {}
    for read in ("frozen", "after"):
        cfg = WORK / f"hook-{read}.toml"
        cfg.write_text(
            "[hook]\n"
            f'log_file = "{WORK}/hook.log"\n'
            f'state_dir = "{WORK}/hook-state"\n'
            f'request_dir = "{WORK}/requests"\n'
            f'storage_base = "{WORK}/snapshots"\n'
            'runtime_roots = ["/run/runc"]\n'
            # One tenant (the containers name no pod): no per-namespace prefix.
            'tenant_prefix = ""\n'
            f'checkpoint_read = "{read}"\n'
        )
        configs[read] = cfg
    sh(args.hook, "--config", configs["frozen"], "install", "--runtime", "podman", "--root", host,
       "--hook-path", args.hook, "--criu-libdir", host / "usr/lib/criu",
       "--criu-plugin", args.plugin, stdout=subprocess.DEVNULL)
    wrapper = "/usr/local/libexec/mapsnap-hook/criu-action"
    installed = (host / "etc/criu/runc.conf").read_text()
    if f"action-script {wrapper}" not in installed:
        sys.exit(f"downtime: unexpected CRIU config from mapsnap-hook install:\n{installed}")
    installed_wrapper = (host / wrapper[1:]).read_text()
    args.hook_installed_config = configs["frozen"]
    crius = {}
    for read, cfg in configs.items():
        # The installed action script, with this variant's config.
        script = WORK / f"criu-action-{read}"
        script.write_text(installed_wrapper.replace(str(args.hook_installed_config), str(cfg)))
        script.chmod(0o755)
        conf = WORK / f"criu-{read}.conf"
        conf.write_text(installed.replace(wrapper, str(script)))
        crius[read] = conf
    # CRIU alone: no action script, a plugin directory without plugins.
    plain = WORK / "criu-plain.conf"
    plain.write_text(
        "".join(l + "\n" for l in installed.splitlines()
                if not l.startswith(("action-script", "libdir")))
        + f"libdir {WORK / 'empty'}\n")
    crius["plain"] = plain
    hooks = {"mapsnap": host / "usr/share/containers/oci/hooks.d", "plain": WORK / "empty"}
    # The image: busybox-static and holdmap.
    rootfs = WORK / "rootfs"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    for d in ("bin", "proc", "sys/fs/bpf", "dev", "tmp", "state"):
        (rootfs / d).mkdir(parents=True)
    busybox = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if Path(p).exists()), None)
    if not busybox:
        sys.exit("downtime: busybox not found: install busybox-static (make deps)")
    shutil.copy(busybox, rootfs / "bin/busybox")
    (rootfs / "bin/sh").symlink_to("busybox")
    shutil.copy(OUT / "holdmap", rootfs / "holdmap")
    image = WORK / "rootfs.tar"
    sh("tar", "-C", rootfs, "-cf", image, ".")
    p = subprocess.run([str(c) for c in pod.cmd(hooks["plain"], "import", image,
                                                "localhost/mapsnap-downtime:bench")],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"downtime: podman import failed:\n{p.stderr}")
    return pod, crius, hooks


def stats_of(text):
    """CRIU's and the runtime's figures from `--print-stats` output (JSON), in ms."""
    start = text.find("{")
    if start < 0:
        sys.exit(f"downtime: no statistics in podman's output:\n{text}")
    s = json.loads(text[start:])
    c = (s.get("container_statistics") or [{}])[0]
    criu = c.get("criu_statistics") or {}
    us = lambda v: (v or 0) / 1000.0
    return {
        "frozen": us(criu.get("frozen_time")),
        "freezing": us(criu.get("freezing_time")),
        "memdump": us(criu.get("memdump_time")),
        "criu_restore": us(criu.get("restore_time")),
        "runtime_ckpt": us(c.get("runtime_checkpoint_duration")),
        "runtime_restore": us(c.get("runtime_restore_duration")),
        "podman_ckpt": us(s.get("podman_checkpoint_duration")),
        "podman_restore": us(s.get("podman_restore_duration")),
    }


def wait_file(path, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            sys.exit(f"downtime: {path} did not appear within {timeout}s")
        time.sleep(0.05)


def hook_log_since(offset):
    log = WORK / "hook.log"
    if not log.exists():
        return []
    with open(log, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    out = []
    for l in lines:
        try:
            out.append(json.loads(l))
        except ValueError:
            pass
    return out


def log_size():
    log = WORK / "hook.log"
    return log.stat().st_size if log.exists() else 0


def one_run(pod, crius, hooks, cli, kind, variant, t, vs, n):
    """One container: start, checkpoint, remove, restore, check, remove. Returns figures."""
    with_ms = variant != "plain"
    name = f"dt-{kind}-{variant}-{t}-{n}"
    state = WORK / "state" / name
    clear_dir(state)
    pins = BPF / name
    clear_dir(pins)
    conf = crius["plain" if not with_ms else ("after" if variant == "after" else "frozen")]
    hooks_dir = hooks["mapsnap" if with_ms else "plain"]
    run = ["run", "-d", "--name", name, "--network", "none",
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
           "--cap-add", "sys_admin", "--cap-add", "bpf",
           "--annotation", f"org.criu.config={conf}", "-v", f"{state}:/state"]
    cmd = ["/holdmap", "/state/ready"]
    # A run that failed half-way (see `measure`) may have left its container.
    subprocess.run([str(c) for c in pod.cmd(hooks_dir, "rm", "--force", "--time", "0", name)],
                   capture_output=True)
    if kind == "pinned":
        sh(OUT / "fill_map", pins / "m", n, vs, t, 4, max_entries(t, n))
        run += ["-v", f"{pins}:/sys/fs/bpf"]
        if with_ms:
            run += ["--annotation", "mapsnap.io/checkpoint-maps=true"]
    elif with_ms:
        cmd.append(f"{t}:{n}:{vs}")
    cid = out_of(*pod.cmd(hooks_dir, *run, "localhost/mapsnap-downtime:bench", *cmd)).strip()
    if kind == "pinned" and variant in ("frozen", "after"):
        # The node agent's request: the maps go to a file outside the image directory.
        (WORK / "requests" / f"{cid}.json").write_text(json.dumps(
            {"checkpoint": f"bench/{name}", "snapshot": str(WORK / "snapshots" / f"{name}.mapsnap")}))
    wait_file(state / "ready")
    archive = WORK / "archives" / f"{name}.tar.zst"
    if archive.exists():
        archive.unlink()
    before = log_size()
    t0 = time.perf_counter()
    # --keep: CRIU's dump.log stays (the plugin's own figures are read from it); every
    # variant keeps it, so the figures stay comparable.
    text = out_of(*pod.cmd(hooks_dir, "container", "checkpoint", "--keep", "--export", archive,
                           "--print-stats", name))
    wall_ckpt = (time.perf_counter() - t0) * 1000
    ck = stats_of(text)
    plugin_ms, plugin_rss = (plugin_figures(pod.dirs[0] / "overlay-containers" / cid / "userdata")
                             if kind == "fd" and with_ms else (None, None))
    scripts_ms = freeze_scripts_ms(pod.dirs[0] / "overlay-containers" / cid / "userdata")
    if KEEP_LOGS:
        # CRIU's dump.log, with its timestamps, shows where the frozen time goes.
        for log in (pod.dirs[0] / "overlay-containers" / cid / "userdata").rglob("dump.log"):
            KEEP_LOGS.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, KEEP_LOGS / f"{name}-{time.strftime('%H%M%S')}.dump.log")
    snaps = WORK / "plugin-snapshots" / name
    if kind == "fd" and with_ms:
        # The plugin's own snapshots, out of the exported archive, for `mapsnap restore`.
        clear_dir(snaps)
        sh("tar", "-xf", archive, "-C", snaps, "--wildcards", "--no-anchored", "mapsnap-map-*.snap")
    sh(*pod.cmd(hooks_dir, "rm", "--force", "--time", "0", name), stdout=subprocess.DEVNULL)
    # A new node: the pins are gone until mapsnap restores them.
    clear_dir(pins)
    (state / "ready").unlink(missing_ok=True)
    # The finisher of the spool/after variants writes the snapshot after the checkpoint; the
    # restore waits for it by itself, but its own figures are read here.
    t0 = time.perf_counter()
    # --keep: CRIU's restore.log stays (the plugin's restore time is read from it).
    text = out_of(*pod.cmd(hooks_dir, "container", "restore", "--keep", "--import", archive,
                           "--print-stats"))
    wall_restore = (time.perf_counter() - t0) * 1000
    rs = stats_of(text)
    plugin_restore_ms = plugin_restore_rss = cli_restore_ms = None
    if kind == "fd" and with_ms:
        # The restored container's id (--import keeps the archive's, but ask).
        rid = out_of(*pod.cmd(hooks_dir, "container", "inspect", "--format", "{{.Id}}",
                              name)).strip()
        plugin_restore_ms, plugin_restore_rss = plugin_restore_figures(
            pod.dirs[0] / "overlay-containers" / rid / "userdata")
        cli_restore_ms = cli_restore(cli, snaps, name)
    restored_ok = True
    if kind == "pinned" and with_ms:
        restored_ok = (pins / "m").exists()
    status = out_of(*pod.cmd(hooks_dir, "container", "inspect", "--format",
                             "{{.State.Status}}", name)).strip()
    restored_ok = restored_ok and status == "running"
    sh(*pod.cmd(hooks_dir, "rm", "--force", "--time", "0", name), stdout=subprocess.DEVNULL)
    clear_dir(pins)
    pins.rmdir()
    shutil.rmtree(state, ignore_errors=True)
    archive.unlink(missing_ok=True)
    (WORK / "requests" / f"{cid}.json").unlink(missing_ok=True)
    for f in (WORK / "snapshots").glob(f"{name}.*"):
        f.unlink()
    if not restored_ok:
        sys.exit(f"downtime: {name}: the restored container is {status}"
                 f"{'' if (pins / 'm').exists() or kind != 'pinned' else ', its pin is missing'}")
    logs = [l.get("fields", {}) for l in hook_log_since(before)]
    post = [l for l in logs if str(l.get("message", "")).startswith("criu post-dump")]
    fin = [l for l in logs if str(l.get("message", "")).startswith("criu finish")]
    hook_rss = [l.get("peak_rss_kib") for l in post]
    finish_rss = [l.get("peak_rss_kib") for l in fin]
    return {
        **{f"ck_{k}": v for k, v in ck.items()},
        **{f"rs_{k}": v for k, v in rs.items()},
        "wall_ckpt": wall_ckpt,
        "wall_restore": wall_restore,
        # Both post-dump runs (runc has CRIU run each action twice), inside the freeze.
        "hook_ms": sum(l.get("elapsed_ms") or 0 for l in post) if post else None,
        "finish_ms": sum(l.get("elapsed_ms") or 0 for l in fin) if fin else None,
        "hook_rss_mib": max([r for r in hook_rss if r] or [0]) / 1024,
        "finish_rss_mib": max([r for r in finish_rss if r] or [0]) / 1024,
        "plugin_ms": plugin_ms,
        "plugin_rss_mib": plugin_rss,
        "scripts_ms": scripts_ms,
        "plugin_restore_ms": plugin_restore_ms,
        "plugin_restore_rss_mib": plugin_restore_rss,
        "cli_restore_ms": cli_restore_ms,
    }


def plugin_restore_figures(userdata):
    """The plugin's restore time (verify and restore every map) and criu's peak RSS."""
    log = next(iter(sorted(userdata.rglob("restore.log"))), None)
    if log is None:
        sys.exit(f"downtime: no restore.log below {userdata}")
    text = log.read_text(errors="replace")
    m = re.search(r"BPF maps restored for \d+ CRIU files, ([0-9.]+) ms, criu peak RSS (\d+) KiB",
                  text)
    if m is None:
        shutil.copy(log, WORK / "last-restore.log")
        sys.exit(f"downtime: the plugin logged no restore in {log} (copied to "
                 f"{WORK / 'last-restore.log'})")
    return float(m.group(1)), int(m.group(2)) / 1024


def cli_restore(cli, snaps, name):
    """`mapsnap restore` of the same snapshots the plugin restored, as new pins; wall ms."""
    files = sorted(snaps.rglob("mapsnap-map-*.snap"))
    if not files:
        sys.exit(f"downtime: the checkpoint archive of {name} holds no plugin snapshot")
    pins = BPF / f"cli-{name}"
    total = 0.0
    for f in files:
        clear_dir(pins)
        t0 = time.perf_counter()
        sh(cli, "--config", WORK / "empty.toml", "restore", "--pin-root", pins, f,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total += (time.perf_counter() - t0) * 1000
    clear_dir(pins)
    pins.rmdir()
    shutil.rmtree(snaps, ignore_errors=True)
    return total


def freeze_scripts_ms(userdata):
    """From CRIU's dump.log timestamps: how long the actions CRIU runs inside the freeze took
    (network-lock: from its start to CRIU's next step; post-dump: from its start to the
    unfreeze). Far less noisy than frozen_time, which also holds CRIU's own dump."""
    log = next(iter(sorted(userdata.rglob("dump.log"))), None)
    if log is None:
        return None
    t = {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\((\d+\.\d+)\) (.*)", line)
        if not m:
            continue
        for key, text in (("lock", "Running network-lock scripts"),
                          ("lock_end", "RPC NOTIFY query-ext-files"),
                          ("post", "Running post-dump scripts"),
                          ("unfreeze", "Unfreezing tasks")):
            if m.group(2).startswith(text) and key not in t:
                t[key] = float(m.group(1))
    if len(t) != 4:
        return None
    return ((t["lock_end"] - t["lock"]) + (t["unfreeze"] - t["post"])) * 1000


def plugin_figures(userdata):
    """The plugin's time and the criu process's peak RSS, from CRIU's dump log."""
    log = next(iter(sorted(userdata.rglob("dump.log"))), None)
    if log is None:
        print(f"downtime: no dump.log below {userdata}: {sorted(str(p) for p in userdata.rglob('*'))[:40]}",
              file=sys.stderr)
        return None, None
    text = log.read_text(errors="replace")
    shutil.copy(log, WORK / "last-dump.log")
    ms = [float(m) for m in re.findall(r"saved \d+ entries \(\d+ bytes\), ([0-9.]+) ms", text)]
    rss = [int(m) for m in re.findall(r"criu peak RSS (\d+) KiB", text)]
    return (sum(ms) if ms else None), (max(rss) / 1024 if rss else None)


def max_entries(t, n):
    """Map size for n entries: an LRU map evicts before it is full (per-CPU free lists), so it
    gets room for twice as many (holdmap.c does the same)."""
    return 2 * n if t == "lru_hash" else n


def anchor_lookup(n, vs, t):
    for line in out_of(OUT / "batch_anchor", n, vs, t, 4096, 4, max_entries(t, n)).splitlines():
        rec = json.loads(line)
        if rec["op"] == "lookup_batch":
            return rec["seconds"] * 1000
    sys.exit("downtime: batch_anchor printed no lookup_batch figure")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, digits=0):
    return "" if v is None else f"{v:.{digits}f}"


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 run, 10K and 100K hash maps only")
    ap.add_argument("--sizes", default="", help="comma-separated entry counts")
    ap.add_argument("--types", default="", help="comma-separated map types")
    ap.add_argument("--variants", default="", help="pinned variants: image,frozen,after")
    ap.add_argument("--kinds", default="pinned,fd", help="pinned, fd or both")
    ap.add_argument("--hook", default="", help="mapsnap-hook binary (default: cargo build --release)")
    ap.add_argument("--plugin", default="", help="libmapsnap_criu.so (default: cargo build --release)")
    ap.add_argument("--cli", default="", help="mapsnap binary (default: cargo build --release)")
    ap.add_argument("--markdown", default="", help="also write the table to this file")
    ap.add_argument("--json", default="", help="also write every figure to this file")
    ap.add_argument("--keep-logs", default="", help="copy each checkpoint's CRIU dump.log here")
    args = ap.parse_args()
    global KEEP_LOGS
    KEEP_LOGS = Path(args.keep_logs) if args.keep_logs else None
    if os.geteuid() != 0:
        sys.exit("downtime: run as root (Podman, CRIU, BPF)")
    sizes = [int(s) for s in args.sizes.split(",") if s] or SIZES
    shapes = SHAPES
    variants = [v for v in args.variants.split(",") if v] or PINNED_VARIANTS
    if args.quick:
        args.runs = 1
        sizes = [int(s) for s in args.sizes.split(",") if s] or [10_000]
        shapes = [s for s in SHAPES if s[0] == "hash"]
    if args.types:
        want = args.types.split(",")
        shapes = [s for s in SHAPES if s[0] in want]
    build(args)
    load_start = loadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    pod, crius, hooks = setup(args)
    results = {}

    def attempt(fn):
        # CRIU's own restore fails now and then on this machine ("mnt: Can't switch"), with
        # or without mapsnap: one retry, said on stderr, instead of losing the whole table.
        try:
            return fn()
        except SystemExit as e:
            print(f"downtime: retrying once after: {e}", file=sys.stderr, flush=True)
            return fn()

    def measure(key, fn):
        runs = [attempt(fn) for _ in range(args.runs)]
        results[key] = {k: median([r[k] for r in runs]) for k in runs[0]}
        results[key]["runs"] = runs
        print(f"downtime: {key}: frozen {fmt(results[key]['ck_frozen'], 1)} ms, checkpoint "
              f"{fmt(results[key]['wall_ckpt'])} ms, restore {fmt(results[key]['wall_restore'])} ms",
              file=sys.stderr, flush=True)

    kinds = args.kinds.split(",")
    small_t, small_vs = shapes[0]
    for kind in kinds:
        measure((kind, "plain", "-", 0),
                lambda: one_run(pod, crius, hooks, args.cli, kind, "plain", small_t, small_vs, min(sizes)))
    anchors = {}
    for t, vs in shapes:
        for n in sizes:
            anchors[(t, n)] = median([anchor_lookup(n, vs, t) for _ in range(args.runs)])
            for v in variants if "pinned" in kinds else []:
                measure(("pinned", v, t, n),
                        lambda: one_run(pod, crius, hooks, args.cli, "pinned", v, t, vs, n))
            if "fd" in kinds:
                measure(("fd", "plugin", t, n),
                        lambda: one_run(pod, crius, hooks, args.cli, "fd", "plugin", t, vs, n))
    load_end = loadavg()
    pod.reset()

    base = {k: results.get((k, "plain", "-", 0)) or results[(kinds[0], "plain", "-", 0)]
            for k in ("pinned", "fd")}
    lines = [
        f"Runs: {args.runs} (medians), {started}, load average at start {', '.join(load_start)}, "
        f"at end {', '.join(load_end)}; {os.cpu_count()} CPUs.",
        "",
        f"CRIU alone: frozen_time {fmt(base['pinned']['ck_frozen'], 1)} ms (container with a bpffs "
        f"mount), {fmt(base['fd']['ck_frozen'], 1)} ms (process holding no map); checkpoint "
        f"{fmt(base['pinned']['wall_ckpt'])} / {fmt(base['fd']['wall_ckpt'])} ms; restore "
        f"{fmt(base['pinned']['wall_restore'])} / {fmt(base['fd']['wall_restore'])} ms; the "
        f"actions inside the freeze (CRIU's log) {fmt(base['pinned']['scripts_ms'], 1)} / "
        f"{fmt(base['fd']['scripts_ms'], 1)} ms.",
        "",
        "| maps | variant | type | entries | lookup_batch loop ms | frozen ms | + frozen ms | "
        "+ frozen / loop | goal | + in freeze, CRIU log ms | mapsnap's own ms | checkpoint ms "
        "(alone) | restore ms (alone) | peak RSS MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for (kind, v, t, n), r in results.items():
        if v == "plain":
            continue
        b = base[kind]
        loop = anchors[(t, n)]
        added = r["ck_frozen"] - b["ck_frozen"]
        ratio = added / loop if loop else None
        # What mapsnap adds inside the freeze by CRIU's own clock: the actions' time beyond
        # CRIU alone's, plus the plugin's time for maps held by fd.
        in_freeze = None
        if r["scripts_ms"] is not None and b["scripts_ms"] is not None:
            in_freeze = r["scripts_ms"] - b["scripts_ms"] + (r["plugin_ms"] or 0)

        def met(x):
            if x is None:
                return "?"
            return "met" if (x <= 20 if v == "after" else x / loop <= 0.6) else "not met"

        bound = "<= 20 ms" if v == "after" else "<= 0.6x"
        goal = f"{bound}: {met(added)}; log: {met(in_freeze)}"
        if kind == "fd":
            own = f"plugin {fmt(r['plugin_ms'], 1)}"
            rss = f"criu {fmt(r['plugin_rss_mib'], 1)}"
        else:
            own = f"post-dump {fmt(r['hook_ms'], 1)}"
            rss = f"hook {fmt(r['hook_rss_mib'], 1)}"
            if r["finish_rss_mib"]:
                own += f"; after: finisher {fmt(r['finish_ms'])}"
                rss += f", finisher {fmt(r['finish_rss_mib'], 1)}"
        lines.append(
            f"| {'pinned' if kind == 'pinned' else 'by fd'} | {v} | {t} | {n:,} | {fmt(loop, 1)} | "
            f"{fmt(r['ck_frozen'], 1)} | {fmt(added, 1)} | {fmt(ratio, 2)} | {goal} | "
            f"{fmt(in_freeze, 1)} | {own} | "
            f"{fmt(r['wall_ckpt'])} ({fmt(b['wall_ckpt'])}) | "
            f"{fmt(r['wall_restore'])} ({fmt(b['wall_restore'])}) | {rss} |")
    fd_rows = [(k, r) for k, r in results.items() if k[0] == "fd" and k[1] == "plugin"]
    if fd_rows:
        lines += [
            "",
            "Restore of maps held by fd: the plugin inside `criu restore` (verify and restore, "
            "from CRIU's restore.log) against `mapsnap restore` of the same snapshot files "
            "(whole command, new pins); goal <= 1.1 x.",
            "",
            "| type | entries | plugin restore ms | `mapsnap restore` ms | ratio | goal | criu peak RSS MiB |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for (_, _, t, n), r in fd_rows:
            p, c = r["plugin_restore_ms"], r["cli_restore_ms"]
            ratio = p / c if p is not None and c else None
            met = "met" if ratio is not None and ratio <= 1.1 else "not met"
            lines.append(f"| {t} | {n:,} | {fmt(p, 1)} | {fmt(c, 1)} | {fmt(ratio, 2)} | "
                         f"<= 1.1x: {met} | {fmt(r['plugin_restore_rss_mib'], 1)} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"key": list(k), **{x: y for x, y in r.items()}} for k, r in results.items()],
            indent=1, default=str))


if __name__ == "__main__":
    main()
