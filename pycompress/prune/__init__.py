from pycompress.prune.block_sparse import block_sparsify
