"""MTAdam (Malkiel & Wolf 2020), the optimizer that balances the terms inside Adam's update.

Nothing here is public API: the optimizer is ``lossbalance.MTAdam`` (functional form
``lossbalance.functional.mtadam``); ``_fused`` holds its optional compiled update.
"""
