"""Runtime weight formats, on the ground floor: quantized tensor types and their
packing layouts. The loader, layers and models read them; quant/ only produces them."""
