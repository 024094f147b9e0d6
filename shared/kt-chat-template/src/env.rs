//! The minijinja environment, set up like transformers' `_compile_jinja_template`.
//!
//! transformers compiles chat templates in a jinja2 `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True`, `lstrip_blocks=True`, the `loopcontrols` extension (`break`,
//! `continue`), its own `{% generation %}` tag, a `tojson` filter that is `json.dumps` with
//! `ensure_ascii=False`, and the globals `raise_exception` and `strftime_now`. Everything a
//! template sees is a plain Python value, so jinja2 prints `None`, `True` and `{'a': 1}`, and
//! templates may call Python string and dict methods.
//!
//! Here the same is built on minijinja:
//! * whitespace flags and loop controls as above;
//! * a formatter and `string`/`join` filters that print values the Python way
//!   ([`crate::python`]);
//! * `tojson` with `json.dumps` semantics (`ensure_ascii`, `indent`, `separators`,
//!   `sort_keys`), `indent` with jinja2's `first`/`blank` keywords, and jinja2's `sequence`
//!   test (strings and dicts are sequences);
//! * Python methods through `minijinja_contrib::pycompat`, plus the few it lacks
//!   (`str.rsplit`, `str.removeprefix`, ...); mutating methods (`list.append`, `dict.update`)
//!   stay unavailable, as in transformers' immutable sandbox;
//! * `raise_exception(msg)`, which fails the render with `msg`, and `strftime_now(fmt)`,
//!   which formats the [`Clock`]'s current time.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::format::{Item, StrftimeItems};
use chrono::NaiveDateTime;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{from_args, Kwargs, Object, ObjectRepr, Rest, ValueKind, ValueOrKwargs};
use minijinja::{filters, Environment, Error, ErrorKind, State, Value};

use crate::python::{self, JsonOptions};

/// The current time as `strftime_now` sees it (local wall-clock time, like Python's
/// `datetime.now()`). Tests inject a fixed one.
pub type Clock = Arc<dyn Fn() -> NaiveDateTime + Send + Sync>;

/// The clock of the machine, in local time.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Local::now().naive_local())
}

/// Python's `None` for the `tools` and `documents` transformers passes when a request has
/// none. minijinja's own none iterates as an empty sequence, where Python raises
/// `TypeError: 'NoneType' object is not iterable`; templates that loop over `tools`
/// unconditionally (Hermes, Command R tool-use variants) must fail the same way. This value
/// is falsy, passes `is none`, prints as `None`, serializes as `null`, and cannot be
/// iterated. (Unlike a real none it is not `== none`; no known template compares so.)
#[derive(Debug)]
pub(crate) struct PyNone;

impl Object for PyNone {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        false
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("None")
    }
}

/// Whether `v` is none for Python: minijinja's none or [`PyNone`].
pub(crate) fn is_py_none(v: &Value) -> bool {
    v.is_none() || v.downcast_object_ref::<PyNone>().is_some()
}

/// The message given to `raise_exception`, carried as the source of the render error so
/// that [`crate::TemplateError::Raised`] can give it back unchanged.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct RaisedException(pub String);

/// Builds the environment (without templates).
pub(crate) fn build(clock: Clock) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.set_formatter(|out, _state, value| {
        if value.kind() == ValueKind::String {
            out.write_str(value.as_str().unwrap_or_default())?;
        } else {
            out.write_str(&python::py_str(value))?;
        }
        Ok(())
    });
    env.set_unknown_method_callback(unknown_method);

    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: &Value| Value::from(python::py_str(v)));
    env.add_filter("join", join);
    env.add_filter("indent", indent);
    // jinja2: anything with a length and indexing, so strings and dicts too.
    env.add_test("sequence", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::Undefined | ValueKind::String | ValueKind::Seq | ValueKind::Map
        )
    });
    env.add_test("none", is_py_none);
    // jinja2: `iter(value)` works; none, numbers and booleans are not iterable.
    env.add_test("iterable", |v: &Value| {
        matches!(
            v.kind(),
            ValueKind::Undefined
                | ValueKind::String
                | ValueKind::Bytes
                | ValueKind::Seq
                | ValueKind::Map
                | ValueKind::Iterable
        )
    });
    // jinja2's map/select/reject/selectattr/rejectattr return generators: they iterate
    // (`| list`, `| join`, `for`) but have no length and are not JSON serializable. A falsy
    // input (none, empty) gives an empty generator.
    macro_rules! generator_filter {
        ($name:literal, $filter:path, $($arg:ident: $ty:ty),*) => {
            env.add_filter($name, |state: &mut State, value: Value, $($arg: $ty),*| {
                if value.is_true() {
                    $filter(state, value, $($arg),*).map(generator)
                } else {
                    Ok(generator(Vec::new()))
                }
            });
        };
    }
    generator_filter!("map", filters::map, args: Rest<ValueOrKwargs>);
    generator_filter!("select", filters::select, test: Option<Cow<'_, str>>, args: Rest<ValueOrKwargs>);
    generator_filter!("reject", filters::reject, test: Option<Cow<'_, str>>, args: Rest<ValueOrKwargs>);
    generator_filter!(
        "selectattr",
        filters::selectattr,
        attr: Cow<'_, str>,
        test: Option<Cow<'_, str>>,
        args: Rest<ValueOrKwargs>
    );
    generator_filter!(
        "rejectattr",
        filters::rejectattr,
        attr: Cow<'_, str>,
        test: Option<Cow<'_, str>>,
        args: Rest<ValueOrKwargs>
    );

    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
    });
    env.add_function("strftime_now", move |fmt: String| -> Result<String, Error> {
        strftime(&clock(), &fmt)
    });
    Ok(env)
}

/// A lazily iterated view of `items`, like a Python generator.
fn generator(items: Vec<Value>) -> Value {
    Value::make_iterable(move || items.clone().into_iter())
}

/// `datetime.strftime` for the specifiers chrono knows (all of C's, plus `%-d` and kin).
pub(crate) fn strftime(now: &NaiveDateTime, fmt: &str) -> Result<String, Error> {
    let items: Vec<Item<'_>> = StrftimeItems::new(fmt).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {fmt:?}"),
        ));
    }
    let mut out = String::new();
    std::fmt::Write::write_fmt(&mut out, format_args!("{}", now.format_with_items(items.iter())))
        .map_err(|_| {
        Error::new(ErrorKind::InvalidOperation, format!("strftime_now: cannot format {fmt:?}"))
    })?;
    Ok(out)
}

/// `tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
/// (`sort_keys` only as a keyword).
fn tojson(
    value: &Value,
    ensure_ascii: Option<bool>,
    indent: Option<Value>,
    separators: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(v) => v,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        Some(v) => Some(v),
        None => separators,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(ErrorKind::InvalidOperation, "tojson: indent must be int or str")
                })?;
                " ".repeat(usize::try_from(n).unwrap_or(0))
            }
        }),
    };
    let separators = match separators {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [i, k] => Some((python::py_str(i), python::py_str(k))),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be an (item, key) pair",
                    ))
                }
            }
        }
    };
    let opts = JsonOptions { ensure_ascii, indent, separators, sort_keys };
    python::json_dumps(value, &opts).map(Value::from)
}

/// jinja2's `join(value, d='', attribute=None)`: items printed with Python's `str()`.
fn join(
    value: &Value,
    sep: Option<String>,
    attribute: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let attribute = match kwargs.get::<Option<Value>>("attribute")? {
        Some(v) => Some(v),
        None => attribute,
    };
    let sep = match kwargs.get::<Option<String>>("d")? {
        Some(v) => v,
        None => sep.unwrap_or_default(),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    if value.is_undefined() {
        return Ok(out);
    }
    let iter = value.try_iter()?;
    for (i, item) in iter.enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        let item = match &attribute {
            Some(attr) => match attr.as_str() {
                Some(path) => {
                    let mut v = item;
                    for part in path.split('.') {
                        v = match part.parse::<usize>() {
                            Ok(idx) => v.get_item(&Value::from(idx))?,
                            Err(_) => v.get_attr(part)?,
                        };
                    }
                    v
                }
                None => item.get_item(attr)?,
            },
            None => item,
        };
        out.push_str(&python::py_str(&item));
    }
    Ok(out)
}

/// jinja2's `indent(s, width=4, first=False, blank=False)`.
fn indent(
    value: &Value,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let width = match kwargs.get::<Option<Value>>("width")? {
        Some(v) => Some(v),
        None => width,
    };
    let first = kwargs.get::<Option<bool>>("first")?.or(first).unwrap_or(false);
    let blank = kwargs.get::<Option<bool>>("blank")?.or(blank).unwrap_or(false);
    kwargs.assert_all_used()?;
    let indention = match width {
        None => "    ".to_owned(),
        Some(w) => match w.as_str() {
            Some(s) => s.to_owned(),
            None => " ".repeat(w.as_usize().unwrap_or(0)),
        },
    };
    let mut s = python::py_str(value);
    s.push('\n');
    let lines = python::splitlines(&s);
    let mut rv = String::new();
    if blank {
        rv = lines.join(&format!("\n{indention}"));
    } else if let Some((head, rest)) = lines.split_first() {
        rv.push_str(head);
        if !rest.is_empty() {
            rv.push('\n');
            let body: Vec<String> = rest
                .iter()
                .map(|l| if l.is_empty() { String::new() } else { format!("{indention}{l}") })
                .collect();
            rv.push_str(&body.join("\n"));
        }
    }
    if first {
        rv.insert_str(0, &indention);
    }
    Ok(rv)
}

/// Python methods on values: kt's additions first, then `minijinja_contrib::pycompat`.
fn unknown_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        if let Some(rv) = extra_string_method(s, method, args)? {
            return Ok(rv);
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn extra_string_method(s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    Ok(Some(match method {
        "rsplit" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let maxsplit = maxsplit.and_then(|n| usize::try_from(n).ok());
            let mut parts: Vec<&str> = match (sep, maxsplit) {
                (Some(sep), Some(n)) => s.rsplitn(n + 1, sep).collect(),
                (Some(sep), None) => s.rsplit(sep).collect(),
                (None, n) => {
                    let mut parts = Vec::new();
                    let mut rest = s.trim_end();
                    while !rest.is_empty() {
                        if n.is_some_and(|n| parts.len() == n) {
                            parts.push(rest);
                            break;
                        }
                        match rest.rfind(char::is_whitespace) {
                            Some(i) => {
                                let ws_len = rest[i..].chars().next().map_or(1, char::len_utf8);
                                parts.push(&rest[i + ws_len..]);
                                rest = rest[..i].trim_end();
                            }
                            None => {
                                parts.push(rest);
                                rest = "";
                            }
                        }
                    }
                    parts
                }
            };
            parts.reverse();
            Value::from_iter(parts.into_iter().map(Value::from))
        }
        "removeprefix" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(s.strip_prefix(prefix).unwrap_or(s))
        }
        "removesuffix" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(s.strip_suffix(suffix).unwrap_or(s))
        }
        "index" | "rindex" => {
            let (what,): (&str,) = from_args(args)?;
            let found = if method == "index" { s.find(what) } else { s.rfind(what) };
            match found {
                Some(i) => Value::from(s[..i].chars().count()),
                None => return Err(Error::new(ErrorKind::InvalidOperation, "substring not found")),
            }
        }
        "partition" | "rpartition" => {
            let (sep,): (&str,) = from_args(args)?;
            let found = if method == "partition" { s.find(sep) } else { s.rfind(sep) };
            let parts = match found {
                Some(i) => [&s[..i], sep, &s[i + sep.len()..]],
                None if method == "partition" => [s, "", ""],
                None => ["", "", s],
            };
            Value::from(minijinja::value::Tuple::from(parts.map(Value::from)))
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> Result<String, Error> {
        let clock: Clock = Arc::new(NaiveDateTime::default);
        let env = build(clock)?;
        env.render_str(source, ctx)
    }

    fn render_ok(source: &str) -> String {
        render(source, Value::from(())).unwrap()
    }

    #[test]
    fn indent_takes_jinja2_keywords() {
        assert_eq!(render_ok("{{ 'a\nb\n\nc' | indent(2) }}"), "a\n  b\n\n  c");
        assert_eq!(render_ok("{{ 'a\nb' | indent(2, first=true) }}"), "  a\n  b");
        assert_eq!(render_ok("{{ 'a\n\nb' | indent('>', blank=true) }}"), "a\n>\n>b");
    }

    #[test]
    fn tojson_options() {
        let src = "{{ {'b': [1, 'ü'], 'a': none} | tojson(indent=1, sort_keys=true) }}";
        assert_eq!(render_ok(src), "{\n \"a\": null,\n \"b\": [\n  1,\n  \"ü\"\n ]\n}");
        assert_eq!(render_ok("{{ 'ü' | tojson(ensure_ascii=true) }}"), "\"\\u00fc\"");
        assert_eq!(
            render_ok("{{ {'a': 1, 'b': 2} | tojson(separators=(',', ':')) }}"),
            "{\"a\":1,\"b\":2}"
        );
        // jinja2's map() is a generator, which json.dumps rejects.
        assert!(render("{{ [1] | map('string') | tojson }}", Value::from(())).is_err());
        assert_eq!(render_ok("{{ [1, 2] | map('string') | list | tojson }}"), "[\"1\", \"2\"]");
    }

    #[test]
    fn python_methods_and_tests() {
        assert_eq!(render_ok("{{ 'a b  c'.rsplit(none, 1) }}"), "['a b', 'c']");
        assert_eq!(render_ok("{{ 'a.b.c'.rsplit('.', 1) }}"), "['a.b', 'c']");
        assert_eq!(render_ok("{{ 'k=v=w'.partition('=') }}"), "('k', '=', 'v=w')");
        assert_eq!(render_ok("{{ 'xxab'.removeprefix('xx') }}"), "ab");
        assert_eq!(render_ok("{{ ' x '.strip() }}|{{ 'a,b'.split(',') }}"), "x|['a', 'b']");
        assert_eq!(render_ok("{{ none is iterable }} {{ 'ab' is sequence }}"), "False True");
        assert_eq!(render_ok("{{ [true, none, 1.5] | join(',') }}"), "True,None,1.5");
        assert_eq!(render_ok("{{ {'a': true} | string }}"), "{'a': True}");
    }

    #[test]
    fn absent_tools_behave_like_python_none() {
        let ctx = Value::from_pairs([("tools", Value::from_object(PyNone))]);
        let out = render(
            "{{ tools }} {{ tools is none }} {{ tools is defined }} {{ tools | tojson }} \
             {% if not tools %}falsy{% endif %} {{ tools | selectattr('x') | list }}",
            ctx.clone(),
        )
        .unwrap();
        assert_eq!(out, "None True True null falsy []");
        assert!(render("{% for t in tools %}{% endfor %}", ctx).is_err());
    }

    #[test]
    fn strftime_formats_the_clock() {
        assert_eq!(render_ok("{{ strftime_now('%Y-%m-%d %B') }}"), "1970-01-01 January");
        assert!(render("{{ strftime_now('%Q') }}", Value::from(())).is_err());
    }
}
