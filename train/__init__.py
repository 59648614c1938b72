"""The fastlars reference trainer (`python -m train`) and the batch-size scaling study (`python -m train.study`)."""
