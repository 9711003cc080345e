from longctx.models.common.state_dict_adapter import DECODER_HF_TO_OURS, DecoderStateDictAdapter


class Qwen2StateDictAdapter(DecoderStateDictAdapter):
    hf_to_ours = DECODER_HF_TO_OURS | {
        "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
        "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
        "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    }
