//! Chat templates: the Jinja template of a `tokenizer_config.json`, rendered with minijinja the
//! way `transformers`' `apply_chat_template` renders it (same globals, Python string methods).

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::error::{DataError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

/// The most template instructions one rendering may run. A chat template is a program from a
/// downloaded file: without a bound, nested loops (`range` allows 100000 items each) hang the
/// job (found by fuzzing). Real templates run a few hundred instructions per message.
pub(crate) const TEMPLATE_FUEL: u64 = 10_000_000;

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compile `source`; `bos_token` and `eos_token` are the strings the template sees.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.clone())
            .map_err(|e| DataError::Template(format!("cannot compile: {e}")))?;
        Ok(ChatTemplate {
            source,
            env,
            bos_token,
            eos_token,
        })
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`; with `add_generation_prompt`, the template's assistant header follows.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| DataError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| DataError::Template(format!("cannot render: {e}")))
    }

    /// TRL's conversational split of a prompt and a completion into text: the prompt rendered with
    /// the generation prompt, and the completion as the rest of the rendered full conversation.
    /// Errors when the full rendering does not start with the prompt rendering.
    pub fn split_prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
    ) -> Result<(String, String)> {
        let user = [Message::new("user", prompt)];
        let p = self.render(&user, true)?;
        let full = self.render(
            &[
                Message::new("user", prompt),
                Message::new("assistant", completion),
            ],
            false,
        )?;
        match full.strip_prefix(p.as_str()) {
            Some(rest) => Ok((p, rest.to_string())),
            None => Err(DataError::Template(
                "the rendered conversation does not start with the rendered prompt".into(),
            )),
        }
    }
}
