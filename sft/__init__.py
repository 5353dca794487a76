"""SFT of the reference / initial policy: pairs (pairs.py), training (train.py), the cached
checkpoint a run starts from (cache.py), `pag sft` (cli.py)."""
