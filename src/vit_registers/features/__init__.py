"""Features at dataset scale (issue 22): `vit-registers embed` writes the features of a whole image dataset as sharded
Parquet (a `datasets` dataset), and `vit-registers eval knn` / `eval linear` run DINOv2's k-NN and linear-probe
evaluations on them.

    embed.py      the `embed` command: DataLoader workers decode and preprocess, the model embeds, shards are written
                  to a temporary name then renamed; resumable, several processes with `accelerate launch`
    store.py      reading an embedding directory back (manifest, shards, feature matrices)
    knn.py        weighted k-NN classifier (cosine similarity, exp(sim / T) votes)
    linear.py     linear classifiers on frozen features with a learning-rate x weight-decay grid
    evaluation.py the `eval` command: results as JSON and a Markdown table

This package imports nothing heavy at module level: the CLI's start-up imports only argparse helpers from it.
"""
