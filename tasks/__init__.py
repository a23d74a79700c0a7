"""The CS224N tasks: readers and prediction writers for SST, CFIMDB, Quora (`data.py`) and the sonnet
files (`sonnets.py`), with validation that names the file and line of any bad input; the sentiment
classifier head (`sentiment.py`) and the paraphrase cloze formulation (`paraphrase.py`); the table of
leaderboard files (`leaderboard.py`)."""
