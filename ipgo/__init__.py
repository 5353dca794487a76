"""IPGO: prompt-embedding optimisation by reward gradients through the diffusion sampler (issue 11).

tokens.py (p_i = R_i(E z_i + b)), conditioning.py ([prefix; states; suffix], conformity), draft.py (the
DRaFT-K sampler), optimize.py (prompt-wise and prompt-batch loops), cli.py (`pag ipgo`).
"""
