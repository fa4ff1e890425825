"""Fused contrastive-loss kernels (Triton, with chunked torch fallbacks and float64 references).

Every public function takes backend="auto" | "triton" | "torch": "auto" runs the Triton kernels on
CUDA tensors and the chunked torch path on CPU; "triton" on CPU tensors runs the same kernels
through the Triton interpreter (see _backend.py); "torch" is the chunked path anywhere. None of
them allocates an N x K logit matrix or a B x K x d gather.

    nt_xent      SimCLR / multi-crop / SupCon loss over M = V*N embeddings
    info_nce     MoCo (queue) or in-batch InfoNCE between queries and keys
    bank_nce     InstDisc / CMC memory-bank loss (softmax or CMC's NCE), bank rows gathered in-kernel
    bank_update  in-place momentum update of bank rows, duplicated indices averaged
    ring_nce     InfoNCE with negatives from a window of similarity ranks (Ring / Ball, Wu et al.)
    local_nce    AMDIM / DIM local NCE: one source per image against every location of every image
"""
from .bank_nce import BankNCEOutput, bank_nce, bank_nce_ref
from .bank_update import bank_update, bank_update_ref
from .info_nce import info_nce, info_nce_ref
from .local_nce import local_nce, local_nce_ref
from .nt_xent import nt_xent, nt_xent_ref
from .ring_nce import ring_nce, ring_nce_ref, ring_sample

__all__ = [
    "BankNCEOutput", "bank_nce", "bank_nce_ref", "bank_update", "bank_update_ref", "info_nce",
    "info_nce_ref", "local_nce", "local_nce_ref", "nt_xent", "nt_xent_ref", "ring_nce", "ring_nce_ref", "ring_sample",
]
