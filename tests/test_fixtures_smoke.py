def test_tiny_models_load(tiny_llama_dir, tiny_bert_dir):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert llama.config.num_hidden_layers == 2 and tok.eos_token == "<|im_end|>"
    bert = AutoModel.from_pretrained(tiny_bert_dir)
    assert bert.config.hidden_size == 32
