import pytest
import torch

from hf_cage.kernels import pack_int4, unpack_int4


def test_golden_word():
    # codes 0..7 -> nibbles 8..15; word = 0xFEDCBA98, lowest nibble first:
    # 1111 1110 1101 1100 1011 1010 1001 1000 (as int32: -0x01234568)
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    assert pack_int4(codes).tolist() == [[0xFEDCBA98 - 2**32]]
    # codes -8..-1 -> nibbles 0..7: 0111 0110 0101 0100 0011 0010 0001 0000
    codes = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    assert pack_int4(codes).tolist() == [[0x76543210]]


def test_round_trip_over_random_codes():
    codes = torch.randint(-8, 8, (5, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 8) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed), codes)


def test_matches_compressed_tensors_packing():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(-8, 8, (7, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(pack_int4(codes), pack_to_int32(codes, num_bits=4))


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 8, dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(1, 1, dtype=torch.int64))
