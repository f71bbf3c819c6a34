"""Write the TensorFlow GPT-2 test fixtures in tests/fixtures/tf/ with real TensorFlow.

TensorFlow is never a botkit dependency: run this in a throwaway virtual environment,

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu regex
    /tmp/tfvenv/bin/python scripts/make_tf_fixtures.py tests/fixtures/tf

It builds a tiny GPT-2 with the graph code of OpenAI's `gpt-2/src/model.py` (as vendored by
gpt-2-simple: `tf.compat.v1` variable scopes, so the variables are named exactly as in OpenAI's
downloads: `model/wte`, `model/h0/attn/c_attn/w`, `model/ln_f/g`...), gives every variable random
values, and writes:

    openai/    the layout of OpenAI's `models/124M`: model.ckpt.{index,data-00000-of-00001},
               checkpoint, hparams.json, encoder.json, vocab.bpe (a tiny byte-level BPE vocabulary);
               without the .meta graph (500 KB here), which botkit never reads
    run1/      the layout of gpt-2-simple's `checkpoint/run1` after 3 Adam steps: model-3.* (no .meta), a
               `checkpoint` file holding the absolute path it was saved under (as on Colab),
               `counter`, and, as a Saver with its default variable list writes them, the Adam
               slots, beta1_power/beta2_power and global_step (gpt-2-simple's own Saver keeps only
               the model's variables; other trainers keep all)
    other/     a TensorFlow checkpoint that is not a GPT-2 (`dense/kernel`, `dense/bias`), with run1's
               hparams.json: what an unknown layout looks like
    many/      500 variables `v000`..`v499` of shape (2,) holding [i, -i] in float32, int64 and float16
               (an index with many restart points and shared key prefixes; TensorFlow's 256 KB
               table blocks hold even a 1558M model's 14 KB index in one block)
    expected.json  the input text, its token ids from OpenAI's encoder.py algorithm
    logits_openai.npy, logits_run1.npy   (1, T, n_vocab) float32 logits computed by TensorFlow
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import regex
import tensorflow as tf
from build_gpt2_tokenizer import bytes_to_unicode  # this folder's; standard library only

HPARAMS = {"n_vocab": 0, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 2}  # n_vocab set from the vocabulary
TEXT = "Hello world, hello botkit! The world says hello."
MERGES = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
    ("Ġ", "h"),
    ("Ġ", "hello"),
    ("Ġ", "b"),
    ("o", "t"),
    ("Ġb", "ot"),
]


# ---- OpenAI's encoder.py (byte-level BPE), condensed (bytes_to_unicode from build_gpt2_tokenizer.py) -------------


def bpe(token: str, ranks: dict) -> list[str]:
    word = list(token)
    while len(word) > 1:
        pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def encode(text: str, encoder: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    byte_encoder, ranks = bytes_to_unicode(), {m: i for i, m in enumerate(merges)}
    ids = []
    for piece in regex.findall(pat, text):
        ids += [encoder[t] for t in bpe("".join(byte_encoder[b] for b in piece.encode("utf-8")), ranks)]
    return ids


# ---- OpenAI's model.py (the graph), condensed; names and maths unchanged -------------------------


def norm(x, scope, *, epsilon=1e-5):
    with tf.compat.v1.variable_scope(scope):
        n_state = x.shape[-1]
        g = tf.compat.v1.get_variable("g", [n_state], initializer=tf.compat.v1.constant_initializer(1))
        b = tf.compat.v1.get_variable("b", [n_state], initializer=tf.compat.v1.constant_initializer(0))
        u = tf.reduce_mean(x, axis=-1, keepdims=True)
        s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
        return (x - u) * tf.math.rsqrt(s + epsilon) * g + b


def conv1d(x, scope, nf):
    with tf.compat.v1.variable_scope(scope):
        *start, nx = x.shape.as_list()
        w = tf.compat.v1.get_variable("w", [1, nx, nf], initializer=tf.compat.v1.random_normal_initializer(stddev=0.02))
        b = tf.compat.v1.get_variable("b", [nf], initializer=tf.compat.v1.constant_initializer(0))
        return tf.reshape(
            tf.matmul(tf.reshape(x, [-1, nx]), tf.reshape(w, [-1, nf])) + b,
            [-1 if s is None else s for s in start] + [nf],
        )


def attn(x, scope, n_state, n_head):
    def split_heads(t):  # (B, T, C) -> (B, heads, T, C / heads)
        return tf.transpose(tf.reshape(t, [1, -1, n_head, n_state // n_head]), [0, 2, 1, 3])

    with tf.compat.v1.variable_scope(scope):
        q, k, v = map(split_heads, tf.split(conv1d(x, "c_attn", n_state * 3), 3, axis=2))
        w = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(n_state // n_head, tf.float32))
        nd = tf.shape(w)[2]
        # causal: 1 on and below the diagonal
        b = tf.cast(tf.range(nd)[:, None] >= tf.range(nd), tf.float32)[None, None]
        w = w * b - 1e10 * (1 - b)
        w = w - tf.reduce_max(w, axis=-1, keepdims=True)
        w = tf.exp(w) / tf.reduce_sum(tf.exp(w), axis=-1, keepdims=True)
        a = tf.reshape(tf.transpose(tf.matmul(w, v), [0, 2, 1, 3]), [1, -1, n_state])
        return conv1d(a, "c_proj", n_state)


def gelu(x):
    return 0.5 * x * (1 + tf.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * tf.pow(x, 3))))


def model(hparams, X):
    with tf.compat.v1.variable_scope("model"):
        wpe = tf.compat.v1.get_variable(
            "wpe",
            [hparams["n_ctx"], hparams["n_embd"]],
            initializer=tf.compat.v1.random_normal_initializer(stddev=0.01),
        )
        wte = tf.compat.v1.get_variable(
            "wte",
            [hparams["n_vocab"], hparams["n_embd"]],
            initializer=tf.compat.v1.random_normal_initializer(stddev=0.02),
        )
        h = tf.gather(wte, X) + tf.gather(wpe, tf.range(tf.shape(X)[1]))[None]
        for layer in range(hparams["n_layer"]):
            with tf.compat.v1.variable_scope(f"h{layer}"):
                nx = hparams["n_embd"]
                h = h + attn(norm(h, "ln_1"), "attn", nx, hparams["n_head"])
                m = norm(h, "ln_2")
                with tf.compat.v1.variable_scope("mlp"):
                    h = h + conv1d(gelu(conv1d(m, "c_fc", nx * 4)), "c_proj", nx)
        h = norm(h, "ln_f")
        logits = tf.matmul(tf.reshape(h, [-1, hparams["n_embd"]]), wte, transpose_b=True)
        return tf.reshape(logits, [1, -1, hparams["n_vocab"]])


def main(out: Path) -> None:
    tf.compat.v1.disable_eager_execution()
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + ["".join(m) for m in MERGES] + ["<|endoftext|>"]
    encoder = {token: i for i, token in enumerate(vocab)}
    hparams = {**HPARAMS, "n_vocab": len(encoder)}
    # gpt-2-simple starts unconditional text at end-of-text
    ids = [encoder["<|endoftext|>"]] + encode(TEXT, encoder, MERGES)

    X = tf.compat.v1.placeholder(tf.int32, [1, None])
    logits = model(hparams, X)
    model_vars = [v for v in tf.compat.v1.trainable_variables() if "model" in v.name]
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=X[:, 1:], logits=logits[:, :-1]))
    global_step = tf.compat.v1.train.get_or_create_global_step()
    train = tf.compat.v1.train.AdamOptimizer(1e-2).minimize(loss, var_list=model_vars, global_step=global_step)

    rng = np.random.default_rng(0)
    shutil.rmtree(out, ignore_errors=True)
    with tf.compat.v1.Session() as sess, tempfile.TemporaryDirectory() as tmp:
        sess.run(tf.compat.v1.global_variables_initializer())
        for v in model_vars:  # values large enough that any mapping mistake moves the logits
            base = 1.0 if v.name.endswith("/g:0") else 0.0
            sess.run(v.assign(base + rng.normal(0, 0.3, v.shape.as_list()).astype(np.float32)))
        feed = {X: [ids]}

        openai = Path(tmp) / "models" / "tiny"
        openai.mkdir(parents=True)
        tf.compat.v1.train.Saver(var_list=model_vars, save_relative_paths=True).save(
            sess, str(openai / "model.ckpt"), write_meta_graph=False
        )
        logits_openai = sess.run(logits, feed)

        run1 = Path(tmp) / "content" / "checkpoint" / "run1"  # absolute paths in `checkpoint`, as on Colab
        run1.mkdir(parents=True)
        for _ in range(3):
            sess.run(train, feed)
        tf.compat.v1.train.Saver().save(sess, str(run1 / "model"), global_step=3, write_meta_graph=False)
        (run1 / "counter").write_text("3\n")
        logits_run1 = sess.run(logits, feed)

        for folder in (openai, run1):
            (folder / "hparams.json").write_text(json.dumps(hparams, indent=2))
            (folder / "encoder.json").write_text(json.dumps(encoder))
            (folder / "vocab.bpe").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8"
            )
        out.mkdir(parents=True)
        shutil.copytree(openai, out / "openai")
        shutil.copytree(run1, out / "run1")

    write_other(out / "other", hparams)
    write_many(out / "many")
    np.save(out / "logits_openai.npy", logits_openai.astype(np.float32))
    np.save(out / "logits_run1.npy", logits_run1.astype(np.float32))
    (out / "expected.json").write_text(
        json.dumps({"text": TEXT, "ids": ids, "tensorflow": tf.__version__}, indent=2) + "\n"
    )
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:8d}  {path.relative_to(out)}")


def write_other(folder: Path, hparams: dict) -> None:
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        with tf.compat.v1.variable_scope("dense"):
            tf.compat.v1.get_variable("kernel", [4, 4], initializer=tf.compat.v1.constant_initializer(0.5))
            tf.compat.v1.get_variable("bias", [4], initializer=tf.compat.v1.constant_initializer(0.0))
        sess.run(tf.compat.v1.global_variables_initializer())
        folder.mkdir(parents=True)
        tf.compat.v1.train.Saver(save_relative_paths=True).save(
            sess, str(folder.resolve() / "model.ckpt"), write_meta_graph=False
        )
    (folder / "hparams.json").write_text(json.dumps(hparams, indent=2))


def write_many(folder: Path) -> None:
    dtypes = (tf.float32, tf.int64, tf.float16)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        for i in range(500):
            tf.compat.v1.get_variable(f"v{i:03d}", initializer=tf.constant([i, -i], dtype=dtypes[i % 3]))
        sess.run(tf.compat.v1.global_variables_initializer())
        folder.mkdir(parents=True)
        tf.compat.v1.train.Saver(save_relative_paths=True).save(
            sess, str(folder.resolve() / "model.ckpt"), write_meta_graph=False
        )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tf"))
