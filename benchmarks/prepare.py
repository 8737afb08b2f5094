"""How fast `gptn prepare` turns text into GPT-2 tokens (MB/s), beside a single-threaded tiktoken encode.

Target (issue): at least 10 MB/s on 2 cores. Text: the Python standard library sources (the embedded
default corpus, ~10 MB) plus the .txt and .tsv files of ../shared/data (~20 MB).
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine, table, write_results  # noqa: E402

from gptn.data import iter_documents, prepare  # noqa: E402
from gptn.tokenizer import load_tokenizer  # noqa: E402


def main():
    sources = ["stdlib", f"{SHARED}/**/*.txt", f"{SHARED}/**/*.tsv"]
    texts = [d.text for d in iter_documents(sources)]
    n_bytes = sum(len(t.encode()) for t in texts)
    tok = load_tokenizer(SHARED / "gpt2-bpe")

    # Peer: plain tiktoken, one thread, the same text.
    enc = tok._tiktoken
    t0 = time.perf_counter()
    for t in texts:
        enc.encode_ordinary(t)
    tiktoken_s = time.perf_counter() - t0

    runs = []
    for _ in range(3):
        out = Path(tempfile.mkdtemp()) / "corpus"
        t0 = time.perf_counter()
        manifest = prepare(sources, str(SHARED / "gpt2-bpe"), out, progress=False)
        runs.append(time.perf_counter() - t0)
        shutil.rmtree(out.parent)
    gptn_s = sorted(runs)[1]
    mb = n_bytes / 1e6
    res = {
        "mb_per_s": mb / gptn_s,
        "tiktoken_single_thread_mb_per_s": mb / tiktoken_s,
        "ratio_vs_tiktoken_single_thread": tiktoken_s / gptn_s,
        "megabytes": mb, "tokens": manifest["tokens"]["train"] + manifest["tokens"]["val"],
        "workers": os.cpu_count(), "seconds_gptn_prepare_median_of_3": gptn_s, "seconds_tiktoken": tiktoken_s,
        "target_mb_per_s": 10.0, "note": "gptn time is the whole `prepare` call: reading, tokenizing, writing shards",
        "machine": machine(),
    }
    print(table([("gptn prepare (all cores, end to end)", f"{res['mb_per_s']:.2f}"),
                 ("tiktoken encode_ordinary, 1 thread", f"{res['tiktoken_single_thread_mb_per_s']:.2f}")],
                ("GPT-2 tokens from text", "MB/s")))
    print(f"{mb:.1f} MB of text; target >= 10 MB/s: {'met' if res['mb_per_s'] >= 10 else 'NOT met'}")
    print("wrote", write_results("prepare", res))


if __name__ == "__main__":
    main()
