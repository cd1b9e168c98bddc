"""The prompts a run continues by default: the reference design's review openings."""

DEFAULT_PROMPTS = ["刚收到货，感觉", "这部电影很", "说实话，真的很", "这次购物总的来说体验很"]
