"""Language-modelling lab: corpora and block packing, word-level RNN/LSTM/Transformer baselines."""
