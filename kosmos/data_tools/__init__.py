"""Dataset -> webdataset shard converters and shard checks (the shard format itself: ``kosmos.data.format``).

    captions.py     image-caption datasets (COCO, folders, tables, img2dataset output)
    interleaved.py  interleaved image-text documents (OBELICS, MMC4)
    urls.py         the image URLs of OBELICS/MMC4 documents as an img2dataset URL list
    text.py         text corpora
    verify.py       decode every sample of a shard folder; inspect.py shows the first samples
    shapes.py       a generated captions dataset for the demo and tests

Shared by the converters:

    records.py      Item / Skipped / Skip / Sample / ConversionError: what flows through a conversion
    images.py       image normalisation (decode, filter, resize, JPEG) and ImageOptions
    tables.py       input readers: jsonl(.gz), parquet, csv, tsv rows; files; text fields
    writer.py       shard writing with chunk resume
    conversion.py   the conversion run and its manifest.json; ShardOptions
    cli.py          the shared command-line options, generated from the option dataclasses
"""
