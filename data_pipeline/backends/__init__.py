"""Stream backends behind :func:`data_pipeline.factory.build_streams`: torch, synthetic, dali."""
