//! An error shown with its causes, for where an error is logged instead of
//! returned: messages name only their own operation and carry the cause as
//! their `source`, so printing one message alone would drop the cause.

use std::error::Error;
use std::fmt;

/// Displays `error: cause: cause of the cause…`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("writing map X")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn shows_every_cause_once() {
        let error = Outer(std::io::Error::other("no space"));
        assert_eq!(Chain(&error).to_string(), "writing map X: no space");
    }
}
