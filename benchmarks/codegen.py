"""The kernels' generated code for an H100 (sm_90a), compiled and read on a CPU: no GPU needed.

    python -m benchmarks.codegen --out DIR [--only REGEX] [--jobs N] [--table]

Every kernel (update, guard, K-profile, the weights kernel, swap, backup, restore) is compiled in every
autotune config it can be launched with, and in the variants that change its code (dtype pairs, warmups,
the guard, ``update_every`` other than 1, unaligned tables, K from 1 to 8). The arguments are the ones the
package's own launchers pass: each launcher runs on CPU tensors with the kernel's ``run`` replaced by a
recorder, and every argument is then specialised as the JIT specialises it at launch (16-byte aligned
pointers and multiples of 16 marked divisible, an int equal to 1 made a constant). ``DIR/report.json``
holds one row per case (see :func:`analyse`); ``DIR/<case>.ptx`` and ``DIR/<case>.sass`` beside it.

Every figure is static: read off the code, nothing run. The bandwidth verdict is a rule of thumb (Little's
law against an H100's HBM3), not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # The recorder must see the real launch path, not the interpreter's (a process of its own: a test
    # session that imports this module for its helpers keeps its interpreter on).
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton 3.9 warns when unset; 1 is its default, the one a launch gets.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

#: sm_90: registers per SM, register allocation unit (per warp), most warps and blocks per SM, shared memory.
SM90 = {"regs": 65536, "reg_unit": 256, "warps": 64, "blocks": 32, "smem": 233472, "smem_per_block": 1024}
#: Bytes a H100 SM must keep in flight to stream at HBM3 speed: 3.35 TB/s x ~0.8 us / 132 SMs ~ 20 KB.
IN_FLIGHT_NEEDED = 20 * 1024


def toolchain_missing() -> str | None:
    """Why the code cannot be compiled and read here, or None when it can."""
    for tool in ("ptxas", "cuobjdump"):
        if not (BIN / tool).exists():
            return f"{tool} not found in {BIN}"
    return None


@dataclass
class Case:
    name: str
    kernel: str  # update, guard, multi, weights, swap, backup, restore
    fn: Any  # the JITFunction
    kwargs: dict[str, Any]  # every argument and meta-parameter, as the launcher passed them
    read: int  # bytes read per element in a full block
    written: int


@contextlib.contextmanager
def recording(kernels: list[Any]) -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Launches of ``kernels`` are recorded (kernel, kwargs) instead of run."""
    calls: list[tuple[Any, dict[str, Any]]] = []
    for k in kernels:
        k.run = lambda *args, _k=k, grid, warmup, **kwargs: calls.append((_k, kwargs))
    try:
        yield calls
    finally:
        for k in kernels:
            del k.run


def _configs(table_kernel: Any, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    from triton_ema.kernels import launch

    pick = getattr(table_kernel, "configs_for", None)
    configs = pick(kwargs) if pick is not None else launch.CONFIGS
    return [c.all_kwargs() for c in configs]


def _record(table_kernel: Any, launcher: Callable[[], Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(config, kwargs) of every config ``table_kernel`` may be launched with by ``launcher()``."""
    from triton_ema.kernels import launch

    with recording([table_kernel.kernel]) as calls:
        launch.FORCED_CONFIG = {"BLOCK": 1024, "ENTRIES_PER_PROGRAM": 1, "num_warps": 4}
        try:
            launcher()
        finally:
            launch.FORCED_CONFIG = None
    out = []
    for _, kwargs in calls:
        base = {k: v for k, v in kwargs.items() if k not in ("BLOCK", "ENTRIES_PER_PROGRAM", "num_warps")}
        for config in _configs(table_kernel, base):
            out.append((config, {**base, **config}))
    return out


def _tag(config: dict[str, Any]) -> str:
    return f"b{config['BLOCK']}-e{config['ENTRIES_PER_PROGRAM']}-w{config['num_warps']}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PAIRS = [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("bf16", "bf16")]
#: Entries of the case tables: neither 1 (a constant) nor a multiple of 16, as most real tables.
N_ELEMENTS = 6 * 4096 + 1000


def _tensors(dtype: str, aligned: bool = True) -> list[torch.Tensor]:
    if aligned:
        return [torch.zeros(N_ELEMENTS, dtype=DTYPES[dtype])]
    return [torch.zeros(N_ELEMENTS + 1, dtype=DTYPES[dtype])[1:]]


def cases(only: str | None = None) -> list[Case]:
    """Every (kernel, variant, config) case, filtered by the regular expression ``only`` on the name."""
    from triton_ema.kernels import ema_update, multi, swap
    from triton_ema.kernels.table import build_table
    from triton_ema.schedules import PowerProfile, ProfileSet, Schedule

    size = {k: v.itemsize for k, v in DTYPES.items()}
    out: list[Case] = []

    def add(name: str, kernel: str, table_kernel: Any, launcher: Callable[[], Any], read: int, written: int):
        # Filter on the name without the config first: recording costs nothing, compiling does.
        for config, kwargs in _record(table_kernel, launcher):
            full = f"{name}-{_tag(config)}"
            if only is None or re.search(only, full):
                out.append(Case(full, kernel, table_kernel.kernel, kwargs, read, written))

    step = torch.ones(1, dtype=torch.int64)
    flag = torch.zeros(1, dtype=torch.int32)
    for p, s in PAIRS:
        variants = {
            "": (Schedule(decay=0.999), None, True),
            "-litema": (Schedule(decay=0.999, warmup="litema"), None, True),
            "-power": (Schedule(decay=0.999, warmup="power"), None, True),
            "-guarded": (Schedule(decay=0.999), flag, True),
            "-every4": (Schedule(decay=0.999, update_every=4), None, True),
            "-unaligned": (Schedule(decay=0.999), None, False),
        }
        for suffix, (schedule, skip, aligned) in variants.items():
            table = build_table(_tensors(p, aligned), _tensors(s, aligned))
            launcher = lambda t=table, sc=schedule, sk=skip, p=p, s=s: ema_update.ema_update(
                t, step, sc, DTYPES[p], DTYPES[s], skip=sk
            )
            add(f"update-{p}-{s}{suffix}", "update", ema_update._update, launcher, size[p] + size[s], size[s])
        for k in range(1, 9):
            for suffix, aligned, skip in (("", True, None), ("-guarded", True, flag), ("-unaligned", False, None)):
                if suffix and k not in (1, 8):
                    continue
                table = build_table(_tensors(p, aligned), *(_tensors(s, aligned) for _ in range(k)))
                weights = torch.full((k,), 0.25)
                launcher = lambda t=table, w=weights, k=k, sk=skip, p=p, s=s: multi.ema_update_multi(
                    t, w, DTYPES[p], DTYPES[s], k, skip=sk
                )
                add(
                    f"multi-k{k}-{p}-{s}{suffix}",
                    "multi",
                    multi._update_multi,
                    launcher,
                    size[p] + k * size[s],
                    k * size[s],
                )
    for d in ("fp32", "bf16", "fp16"):
        for suffix, aligned in (("", True), ("-unaligned", False)):
            table = build_table(_tensors(d, aligned))
            add(
                f"guard-{d}{suffix}",
                "guard",
                ema_update._nonfinite,
                lambda t=table: ema_update.nonfinite_(t, flag),
                size[d],
                0,
            )
    for d in ("fp32", "bf16", "fp16"):
        for suffix, aligned in (("", True), ("-unaligned", False)):
            table = build_table(_tensors(d, aligned), _tensors(d, aligned))
            add(
                f"swap-{d}{suffix}",
                "swap",
                swap._swap,
                lambda t=table, d=d: swap.swap_(t, DTYPES[d]),
                2 * size[d],
                2 * size[d],
            )
    for p in ("bf16", "fp16"):
        for suffix, aligned in (("", True), ("-unaligned", False)):
            params, shadows = _tensors(p, aligned), _tensors("fp32", aligned)
            add(
                f"backup-{p}-fp32{suffix}", "backup", swap._swap,
                lambda a=params, b=shadows: swap.backup_and_load_(a, b), size[p] + 4, 2 * size[p],
            )  # fmt: skip
            table = build_table(params, shadows, _tensors(p, aligned))
            add(
                f"restore-{p}-fp32{suffix}", "restore", swap._swap,
                lambda t=table, p=p: swap.restore_([t], DTYPES[p], torch.float32), size[p], size[p],
            )  # fmt: skip
    # The weights kernel: one program, no config.
    profile_sets = {
        "power": [PowerProfile(0.05 + 0.01 * i) for i in range(8)],
        "decay": [Schedule(decay=1 - 10 ** -(2 + i / 4)) for i in range(8)],
        "litema": [Schedule(decay=1 - 10 ** -(2 + i / 4), warmup="litema") for i in range(8)],
        "warmup-power": [Schedule(decay=1 - 10 ** -(2 + i / 4), warmup="power") for i in range(8)],
    }
    for kind, members in profile_sets.items():
        for k in range(1, 9):
            name = f"weights-{kind}-k{k}"
            if only is not None and not re.search(only, name):
                continue
            outbuf = torch.zeros(k)
            with recording([multi._profile_weights_kernel]) as calls:
                multi._weights_launches.clear()
                multi.profile_weights_(step, ProfileSet(tuple(members[:k])), outbuf)
            (fn, kwargs), *_ = calls
            out.append(Case(name, "weights", fn, {**kwargs, "num_warps": kwargs.get("num_warps", 4)}, 0, 0))
    return out


def _specialise(fn: Any, kwargs: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Signature, constants, attributes and options as ``JITFunction.run`` would compile them."""
    backend = make_backend(TARGET)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        specialize = param.num not in fn.do_not_specialize
        kind, spec = native_specialize_impl(BaseBackend, value, False, specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs, options


def compile_case(case: Case) -> tuple[str, str]:
    """(PTX, SASS) of ``case`` for sm_90a."""
    signature, constexprs, attrs, options = _specialise(case.fn, case.kwargs)
    compiled = triton.compile(ASTSource(case.fn, signature, constexprs, attrs), target=TARGET, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        # One call for both: each cuobjdump run costs about as much as a small kernel's ptxas.
        sass = subprocess.run(
            [str(BIN / "cuobjdump"), "-sass", "-res-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return compiled.asm["ptx"], sass


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PTX_MEM = re.compile(r"^\s*(@!?%p\d+\s+)?(ld|st)\.global(\.[\w.]+)?\s", re.M)


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    return [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]


def _occupancy(regs: int, shared: int, warps: int) -> float:
    per_warp = -(-max(regs, 1) * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    blocks = min(SM90["blocks"], (SM90["regs"] // per_warp) // warps, SM90["warps"] // warps)
    if shared:
        blocks = min(blocks, SM90["smem"] // (shared + SM90["smem_per_block"]))
    return blocks * warps / SM90["warps"]


def data_access_bits(ptx: str) -> list[int]:
    """Widths in bits of the unpredicated global accesses that move data: vectors, and 16-bit scalars.

    Unpredicated accesses are the full blocks' (a masked access is predicated); the table lookups are
    32- and 64-bit scalars. An unaligned table's full blocks are scalar too: none then.
    """
    widths = []
    for pred, _, suffix in _PTX_MEM.findall(ptx):
        if pred:
            continue
        parts = (suffix or "").strip(".").split(".")
        lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bfus]\d+", p)), 0)
        if lanes > 1 or bits == 16:
            widths.append(lanes * bits)
    return widths


def analyse(case: Case, ptx: str, sass: str) -> dict[str, Any]:
    """One report row. ``instr_per_elem``: SASS instructions of the unmasked full-block path per element.

    That path is found from the basic block whose vector accesses move the most bytes. In the shared
    walker's layout (``walk_entries``) it is the unrolled full entry: that block and the memory-free
    blocks after it up to the next branch (the per-entry latch), over ``ENTRY`` elements. In a
    loop-per-block layout (the code before the walker) it is the innermost loop around that block, from
    its head and from the first block with vector accesses on, without the blocks holding predicated
    scalar (masked) accesses, over ``BLOCK`` elements. Elements per thread come from the config, not from
    the loads' bytes: a 64-bit load of an address reads like a vector of data in SASS. Table lookups, the
    masked tail and the per-program code are not counted.
    """
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", sass)
    regs, stack, shared, local = (int(x) for x in usage.groups()) if usage else (0, 0, 0, 0)
    insts = _sass_instructions(sass)
    warps = case.kwargs.get("num_warps", 4)
    spills = sum(1 for _, t in insts if re.search(r"\b(LDL|STL)\b", t))
    bars = sum(1 for _, t in insts if "BAR.SYNC" in t or re.search(r"\bBAR\b", t))
    divs = sorted(set(re.findall(r"\bdiv(?:\.\w+)+", ptx)))
    widths = data_access_bits(ptx)
    row: dict[str, Any] = {
        "name": case.name,
        "kernel": case.kernel,
        "config": {k: case.kwargs[k] for k in ("BLOCK", "ENTRIES_PER_PROGRAM", "num_warps") if k in case.kwargs},
        "registers": regs,
        "spills": spills + local + stack,
        "shared": shared,
        "bar_sync": bars,
        "occupancy": round(_occupancy(regs, shared, warps), 3),
        "access_bits": min(widths) if widths else None,
        "divisions": divs,
        "vector_accesses": sorted(
            {op for op in re.findall(r"(?:ld|st)\.global[.\w]*", ptx) if re.search(r"\.v\d\.", op)}
        ),
        "float_args": {
            p.name: t
            for p, t in zip(case.fn.params, _specialise(case.fn, case.kwargs)[0].values())
            if t in ("fp32", "fp64")
        },
        "bytes_per_elem": case.read + case.written,
    }
    # Basic blocks: a branch target starts one, a branch or an exit ends one.
    targets = {int(m, 16) for _, t in insts for m in re.findall(r"BRA (0x[0-9a-f]+)", t)}
    blocks: list[list[tuple[int, str]]] = [[]]
    for a, t in insts:
        if a in targets and blocks[-1]:
            blocks.append([])
        blocks[-1].append((a, t))
        if re.search(r"\b(BRA|EXIT)\b", t):
            blocks.append([])
    blocks = [b for b in blocks if b]
    # A full block's data accesses are vectors, unpredicated or under a uniform per-profile predicate (the
    # K-profile kernel skips a profile whose weight is 0); a masked tail's are predicated scalars.
    vector = re.compile(r"(?:@!?P\d+ )?(?:LDG|STG)\.E\.(64|128)\b")
    tail = re.compile(r"@!?P\d+ (LDG|STG)\.E(\.U16|\.U8)?\s")

    # An unaligned table's full blocks move data in unpredicated scalar accesses.
    scalar = re.compile(r"(?:LDG|STG)\.E(\.U16|\.U8)?\s")
    width = {".U16": 2, ".U8": 1, None: 4}

    def moved(block: list[tuple[int, str]]) -> int:
        vectors = sum(int(m.group(1)) // 8 for _, t in block if (m := vector.match(t)))
        return vectors + sum(width[m.group(1)] for _, t in block if (m := scalar.match(t)))

    # Ties go to a block that stores, then to 128-bit accesses: the table lookups before the data (64-bit
    # loads of addresses) may move as many bytes as one block's data, but never store.
    best = max(
        range(len(blocks)),
        key=lambda i: (
            moved(blocks[i]),
            sum("STG" in t for _, t in blocks[i]),
            sum(".E.128" in t for _, t in blocks[i]),
        ),
    )
    if not moved(blocks[best]) or case.kernel == "weights":
        row.update(instr_per_elem=None, in_flight_per_sm=None)
        row["verdict"] = _verdict(row)
        return row
    threads = 32 * warps
    if "walk_entries" in case.fn.src:
        # The shared walker unrolls a full entry: from the block that moves the most bytes (its first loads;
        # the table lookups before it move a few) through the blocks that follow without masked accesses
        # (the K-profile kernel branches around a profile's stores when its weight is 0), up to and with
        # the one that leaves: a jump back or away, an exit (the per-entry latch is counted in full, as if
        # paid per block: an overstatement).
        counted = []
        for b in blocks[best:]:
            if any(tail.match(t) for _, t in b):
                break
            counted.append(b)
            last = b[-1][1]
            m = re.match(r"(@!?U?P\w+ )?BRA (0x[0-9a-f]+)", last)
            if "EXIT" in last or (m and (not m.group(1) or int(m.group(2), 16) <= b[-1][0])):
                break
        elems = case.kwargs["ENTRY"] / threads
    else:
        # A loop per block (the layout before the walker, commit 4cf1be9): the innermost loop around that
        # block, from its head, without the blocks that hold masked accesses or come before the first
        # block with vector accesses (the masked path sits there); one block's elements per iteration.
        head = blocks[best][0][0]
        loops = []
        for a, t in insts:
            m = re.match(r"(?:@!?U?P\w+ )?BRA (0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) <= head and a >= blocks[best][-1][0]:
                loops.append((int(m.group(1), 16), a))
        lo, hi = min(loops, key=lambda lp: lp[1] - lp[0]) if loops else (head, blocks[best][-1][0])
        inside = [b for b in blocks if lo <= b[0][0] <= hi]
        first_vector = min(b[0][0] for b in inside if moved(b))
        counted = [
            b
            for i, b in enumerate(inside)
            if (i == 0 or b[0][0] >= first_vector) and not any(tail.match(t) for _, t in b)
        ]
        elems = case.kwargs["BLOCK"] / threads
    hot = [t for b in counted for _, t in b]
    in_loads = moved([(0, t) for t in hot if "LDG" in t])
    row["instr_per_elem"] = round(len(hot) / elems, 2) if elems else None
    threads_per_sm = row["occupancy"] * SM90["warps"] * 32
    row["in_flight_per_sm"] = int(threads_per_sm * in_loads)
    row["verdict"] = _verdict(row)
    return row


def _verdict(row: dict[str, Any]) -> str:
    problems = []
    if row["spills"]:
        problems.append("spills")
    if row["bar_sync"] and row["kernel"] != "guard":
        problems.append("layout conversion through shared memory")
    if any(d.startswith("div.full") or d.startswith("div.approx") for d in row["divisions"]):
        problems.append("approximate division")
    if row["registers"] > 128:
        problems.append(f"{row['registers']} registers")
    if row["kernel"] == "weights":
        return "; ".join(problems) or "ok (one program, not on the bandwidth path)"
    if row["access_bits"] is None:
        problems.append("scalar accesses (unaligned table)")
    elif row["access_bits"] < 128:
        problems.append(f"{row['access_bits']}-bit accesses")
    flight = row.get("in_flight_per_sm")
    if flight is not None and flight < IN_FLIGHT_NEEDED:
        problems.append(f"latency-bound ({flight // 1024} KiB in flight per SM)")
    return "; ".join(problems) or "bandwidth-bound"


def _run(case: Case) -> tuple[dict[str, Any], str, str]:
    ptx, sass = compile_case(case)
    return analyse(case, ptx, sass), ptx, sass


def _run_named(args: tuple[str, str | None]) -> tuple[dict[str, Any], str, str]:
    # In a worker process: cases hold JIT functions and lambdas' results, rebuilt there by name.
    name, only = args
    (case,) = [c for c in cases(only) if c.name == name]
    return _run(case)


def _cost(case: Case) -> int:
    """A rough rank of a case's compile time: a full entry's elements per thread (the walker unrolls it)
    times the values per element."""
    profiles = int(m[1]) if (m := re.search(r"-k(\d)", case.name)) and case.kernel == "multi" else 1
    per_thread = case.kwargs.get("ENTRY", 1) // (32 * case.kwargs.get("num_warps", 4))
    return per_thread * (profiles + 1)


def report(only: str | None = None, jobs: int = 1, out: Path | None = None) -> list[dict[str, Any]]:
    """Compile every case matching ``only`` and return the rows; with ``out``, write the report and the code."""
    todo = cases(only)
    if jobs > 1:
        # The costliest compiles first (the K-profile kernel's grow with K), so that no worker is left
        # with a long one at the end while the others idle; rows keep the cases' order.
        order = sorted(range(len(todo)), key=lambda i: -_cost(todo[i]))
        with ProcessPoolExecutor(jobs) as pool:
            done = pool.map(_run_named, [(todo[i].name, f"^{re.escape(todo[i].name)}$") for i in order])
            by_index = dict(zip(order, done))
        results = [by_index[i] for i in range(len(todo))]
    else:
        results = [_run(c) for c in todo]
    rows = [r for r, _, _ in results]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for row, ptx, sass in results:
            (out / f"{row['name']}.ptx").write_text(ptx)
            (out / f"{row['name']}.sass").write_text(sass)
        meta = {"triton": triton.__version__, "torch": torch.__version__, "target": "sm_90a (cuda, 90, warp 32)"}
        (out / "report.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| case | regs | occupancy | access bits | instr/elem | B/elem | BAR | verdict |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['registers']} | {r['occupancy']:.0%} | {r['access_bits'] or '-'} | "
            f"{r['instr_per_elem'] if r['instr_per_elem'] is not None else '-'} | {r['bytes_per_elem'] or '-'} | "
            f"{r['bar_sync']} | {r['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="a regular expression on case names")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(f"cannot compile for sm_90 here: {missing}", file=sys.stderr)
        return 2
    rows = report(args.only, args.jobs, args.out)
    print(f"{len(rows)} cases -> {args.out / 'report.json'}")
    if args.table:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
