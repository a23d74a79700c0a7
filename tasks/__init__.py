"""The CS224N tasks' data: readers and prediction writers for SST, CFIMDB, Quora (sonnet files live in
`evaluation/sonnets.py`), with validation that names the file and line of any bad input."""
