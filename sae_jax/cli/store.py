"""`sae-jax store import|info|verify`: import, inspect and verify activation stores."""

from __future__ import annotations

from sae_jax.cli import common


def add_parser(subparsers, parents) -> None:
    p = subparsers.add_parser("store", help="import, inspect and verify activation stores",
                              formatter_class=common.DefaultsFormatter)
    actions = p.add_subparsers(dest="store_cmd", required=True, metavar="ACTION")
    si = common.command(actions, "import", run_import, parents=[parents.restart],
                        help="import .npy / .safetensors files [n, d] into a new store")
    si.add_argument("out", help="output store directory")
    si.add_argument("--from", dest="files", nargs="+", required=True, help="input files, concatenated in order")
    si.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
    common.command(actions, "info", run_info, help="print a store's metadata and statistics").add_argument("store")
    common.command(actions, "verify", run_verify, help="check every shard checksum of a store").add_argument("store")


def run_import(args) -> int:
    from sae_jax.data import store as store_lib

    store = store_lib.import_files(args.out, args.files, dtype=args.dtype, resume=args.resume,
                                   overwrite=args.overwrite)
    print(f"imported {store.n_tokens:,} rows × {store.d_model} into {args.out}")
    return 0


def run_info(args) -> int:
    from sae_jax.data import store as store_lib

    print(store_lib.info(store_lib.open_store(args.store)))
    return 0


def run_verify(args) -> int:
    from sae_jax.data import store as store_lib

    problems = store_lib.open_store(args.store).verify()
    for p in problems:
        print(f"FAIL {p}")
    print("OK: every checksum matches" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1
