//! The one interface model code loads weights through, whatever the file format.

use kt_core::WeightTensor;

use crate::gguf::{GgufFile, GgufModel};
use crate::hf::HfFolder;
use crate::safetensors::SafetensorsFile;
use crate::FormatError;

/// Something that hands out weight tensors by name.
pub trait TensorSource {
    /// The tensor `name`; [`FormatError::TensorNotFound`] when there is none.
    fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError>;
    fn contains(&self, name: &str) -> bool;
    /// Every tensor name, in file order.
    fn tensor_names(&self) -> Vec<String>;
}

macro_rules! tensor_source {
    ($($t:ty),*) => {
        $(impl TensorSource for $t {
            fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
                <$t>::tensor(self, name)
            }
            fn contains(&self, name: &str) -> bool {
                <$t>::contains(self, name)
            }
            fn tensor_names(&self) -> Vec<String> {
                <$t>::tensor_names(self)
            }
        })*
    };
}
tensor_source!(GgufFile, GgufModel, SafetensorsFile, HfFolder);

impl<T: TensorSource + ?Sized> TensorSource for &T {
    fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        (**self).tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn tensor_names(&self) -> Vec<String> {
        (**self).tensor_names()
    }
}

impl<T: TensorSource + ?Sized> TensorSource for std::sync::Arc<T> {
    fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        (**self).tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn tensor_names(&self) -> Vec<String> {
        (**self).tensor_names()
    }
}

impl<T: TensorSource + ?Sized> TensorSource for Box<T> {
    fn tensor(&self, name: &str) -> Result<WeightTensor, FormatError> {
        (**self).tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn tensor_names(&self) -> Vec<String> {
        (**self).tensor_names()
    }
}
