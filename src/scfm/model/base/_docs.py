"""Parameter docs shared by the five models, in one place (docrep, as scvi-tools does).

A model's docstring writes ``%(param_gene_id_key)s`` and decorates the method with
``@scfm_dsp.dedent``; the text below is substituted, so five models never carry five copies.
"""

from __future__ import annotations

from docrep import DocstringProcessor

__all__ = ["scfm_dsp"]

scfm_dsp = DocstringProcessor(
    param_adata="""\
adata
    AnnData registered with ``setup_anndata`` (raw counts, any gene set and order: its genes
    are aligned to the model's vocabulary); ``None`` uses the model's own AnnData.""",
    param_indices="""\
indices
    Positions of the cells to use (or a boolean mask); ``None`` uses all. Results come back
    in this order.""",
    param_batch_size="""\
batch_size
    Cells per minibatch; ``None`` uses the model's default. Results do not depend on it.""",
    param_progress_bar="""\
progress_bar
    Show a progress bar.""",
    param_layer="""\
layer
    ``adata.layers`` key holding the raw counts; ``None`` uses ``adata.X``.""",
    param_batch_key="""\
batch_key
    Categorical ``adata.obs`` column with the batch / sample of each cell.""",
    param_labels_key="""\
labels_key
    Categorical ``adata.obs`` column with cell labels.""",
    param_gene_id_key="""\
gene_id_key
    ``adata.var`` column with gene ids; ``None`` uses ``adata.var_names``. Symbols and
    Ensembl ids are both accepted: ids of the other kind are converted with the bundled
    GENCODE v48 table, id by id.""",
    param_allow_non_integer="""\
allow_non_integer
    Accept non-negative, non-integer values (alevin-fry, SoupX, TPM) with a warning instead
    of raising :class:`~scfm.errors.CountDataError`. Raw integer counts are what the models
    were trained on; log-normalised data is still refused whatever this says.""",
    param_check_gene_overlap="""\
check_gene_overlap
    Raise :class:`~scfm.errors.GeneVocabularyError` when the AnnData's genes overlap the
    model's vocabulary too little to be meaningful (wrong species, id type or case). Set
    ``False`` only for a targeted panel that really is that small.""",
    param_key_added_obsm="""\
key_added
    ``.obsm`` key; default ``"X_<model name>"``. The call's options are recorded in
    ``adata.uns["scfm"]["obsm"][key_added]``.""",
    param_options="""\
**options
    Model-specific options (see the model class): ``hidden_layer`` (encoder layer read,
    Python indexing, ``-1`` = last), ``pooling`` (how token states become a cell vector),
    ``seed`` and the options of a release.""",
)
