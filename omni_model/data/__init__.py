"""Data: chat formats, Data-Juicer processing, WebDataset/Energon shards, the task encoder that feeds training."""
