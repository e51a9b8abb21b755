

@pytest.mark.parametrize("make,targets", [(_conv_net, ["c1", "c2", "fc"]),
                                          pytest.param(_mha_net, ["mha", "lin"], marks=pytest.mark.slow)])
def test_several_adapters_on_convolutions_and_attention(make, targets):
    """add_adapter / set_adapter / disable_adapters / merge / delete_adapter through the kinds' base_op,
    unmerge and insert: a second adapter on a grouped convolution and on an attention's projections."""
    base, x = make()
    cm = lorafx.compile(base, example_inputs=(x,), r=2, target_modules=targets).eval()
    with torch.no_grad():
        for rec in cm.lora_records().values():
            get_attr(cm, rec.lora_B).fill_(0.05)
    want = cm(x).detach()
    cm.add_adapter("other", r=4, target_modules=targets, seed=3)
    cm.set_adapter("other")
    torch.testing.assert_close(cm(x), base(x), **TOL)  # its B = 0
    cm.set_adapter("default")
    torch.testing.assert_close(cm(x), want, **TOL)
    with cm.disable_adapters():
        torch.testing.assert_close(cm(x), base(x), **TOL)
    cm.merge()
    torch.testing.assert_close(cm(x), want, **TOL)
    cm.unmerge()
    cm.delete_adapter("other")
    torch.testing.assert_close(cm(x), want, **TOL)
