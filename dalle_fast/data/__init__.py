"""Data: the caption tokenizer, the built-in shapes data, readers for folders, COCO and WebDataset
shards, the batches of a run, and the token cache of stage 2."""
