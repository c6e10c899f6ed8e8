"""Read an activation cache in SAELens's layout with SAELens's own `ActivationsStore`, as a SAELens training run with
`use_cached_activations=True` does: every activation it yields in one epoch, batch after batch, in order, saved to
OUT (safetensors: `activations`). tests/test_saelens_cache.py runs it on `saelab-cache export --format saelens` to
check SAELens reads exactly saelab's activations.

Run with a Python that has sae-lens installed (scripts/saelens_compat/venv.sh makes one at $SAELENS_VENV):
    $SAELENS_VENV/bin/python scripts/saelens_compat/read_cache_in_saelens.py CACHE OUT.safetensors [--exclude 0,1]
The excluded token ids (SAELens's `exclude_special_tokens`) are --exclude's, else those saelab's export lists in
CACHE/saelab_export.json, else none. The store reads batches of --batch windows (default: the largest divisor of
the window count up to 64, so no partial batch is skipped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import sae_lens
import torch
from sae_lens.training.activations_store import ActivationsStore
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--exclude", help="comma-separated token ids (default: saelab_export.json's, else none)")
    parser.add_argument("--batch", type=int, help="windows per store batch (store_batch_size_prompts)")
    args = parser.parse_args()
    info = json.loads((args.cache / "dataset_info.json").read_text())
    features = datasets.Features.from_dict(info["features"])
    hook, column = next((name, f) for name, f in features.items() if isinstance(f, datasets.Array2D))
    context_size, d_in = column.shape
    sidecar = args.cache / "saelab_export.json"
    if args.exclude is not None:
        exclude = [int(i) for i in args.exclude.split(",") if i.strip()]
    elif sidecar.exists():
        exclude = json.loads(sidecar.read_text())["saelens"]["exclude_special_tokens"]
    else:
        exclude = []
    n_windows = datasets.load_from_disk(str(args.cache)).num_rows
    batch = args.batch or max(b for b in range(1, 65) if n_windows % b == 0)
    store = ActivationsStore(model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
                             context_size=context_size, d_in=d_in, n_batches_in_buffer=2,
                             total_training_tokens=n_windows * context_size, store_batch_size_prompts=batch,
                             train_batch_size_tokens=batch * context_size, prepend_bos=False,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(args.cache),
                             exclude_special_tokens=torch.tensor(exclude, dtype=torch.long) if exclude else None)
    batches = []
    while True:
        try:
            batches.append(store.get_filtered_llm_batch(raise_on_epoch_end=True))
        except StopIteration:
            break
    activations = torch.cat(batches)
    save_file({"activations": activations.contiguous()}, str(args.out))
    print(json.dumps({"sae_lens": sae_lens.__version__, "hook": hook, "windows": n_windows, "batch": batch,
                      "exclude_special_tokens": exclude, "rows": len(activations)}))


if __name__ == "__main__":
    main()
