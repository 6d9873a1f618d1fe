"""Modeling files saved next to a pruned model so that it loads with transformers alone.

`hywia.io.save.save_model` copies FILES into a pruned folder and points config.json's `auto_map` at them, so
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where hywia is not installed. The
files import only torch and transformers; hywia copies them and never imports them itself.
"""

from pathlib import Path

DIR = Path(__file__).parent
FILES = ("configuration_hywia.py", "modeling_hywia.py")
# model_type of the pruned configs the files define (the same as hywia's registered pruned classes)
MODEL_TYPES = frozenset({"hywia_llama", "hywia_mistral", "hywia_qwen2"})
