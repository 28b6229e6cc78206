"""Token conventions the models share with the tokenizer that feeds them."""

PAD = -1  # an unused text position; the transformer fills it with its position's learned pad embedding
