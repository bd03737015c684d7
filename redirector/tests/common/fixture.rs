//! netns fixtures (filled in below).
