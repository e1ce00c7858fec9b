"""What the tests share: the commands a user runs, tiny federations, FeTS-shaped files and fake server parts."""
