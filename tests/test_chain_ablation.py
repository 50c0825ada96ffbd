from bench.chain_ablation import FAMILIES, ROUTER, WEIGHT_KERNELS, variants

# what a Flash decode step launches (bench/results/chain-ablation-flash4-s29-h200.json, decode and prefill)
LAUNCHED = {"dsv4_argmax_rows", "dsv4_compressor_step", "dsv4_fp8_gemv_fused_grouped_m8", "dsv4_fp8_gemv_fused_m8",
            "dsv4_fp8_gemv_fused_norm_m8", "dsv4_fp8_gemv_fused_swiglu_m8", "dsv4_hc_post_pre_mix",
            "dsv4_hc_pre_finish", "dsv4_hc_pre_finish_beside", "dsv4_hc_pre_mix", "dsv4_hc_pre_sinkhorn",
            "dsv4_head_gemv_bf16_rows", "dsv4_index_query", "dsv4_indexer_scores", "dsv4_indexer_topk",
            "dsv4_moe_down_decode_wgmma", "dsv4_moe_gate_up_decode_wgmma", "dsv4_moe_sum_pairs_post",
            "dsv4_q_heads", "dsv4_route_topk_s8", "dsv4_sparse_attention_combine", "dsv4_sparse_attention_split_d4"}


def test_every_ablation_holds_the_router_and_leaves_out_only_launched_kernels():
    """Left out upstream of the gate, a producer leaves its logits uninitialised, and a router that then ran
    could name an expert past the table and fault the step (session 29's probe, twice): so every ablation
    and its baseline leave the router out, and only the real step runs it."""
    got = variants(LAUNCHED)
    assert got["default"] == set()
    assert got["router_held"] == got["router_held_again"] == ROUTER
    for label in [*FAMILIES, "only_weight_kernels", "no_weight_kernels"]:
        assert ROUTER <= got[label] and got[label] - ROUTER <= LAUNCHED, label
    assert got["only_weight_kernels"] & WEIGHT_KERNELS == set()
    assert got["only_weight_kernels"] | WEIGHT_KERNELS >= LAUNCHED - {"dsv4_argmax_rows"} - ROUTER
    assert got["no_weight_kernels"] - ROUTER == WEIGHT_KERNELS & LAUNCHED
    assert got["attention_split"] == {"dsv4_sparse_attention_split_d4"} | ROUTER
