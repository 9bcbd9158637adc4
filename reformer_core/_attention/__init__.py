"""The attention algorithms, once, against the Array API: hashing, sorting, chunking, the
masked softmax, the round combination, and LSH, local and full attention (private; the
public functions are re-exported by ``reformer_core``)."""
