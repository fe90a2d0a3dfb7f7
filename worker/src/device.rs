//! Device selection: `cpu`, `cuda` or `cuda:N`, as people type it on the command line.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::WorkerError;

/// Which device to train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    Cpu,
    /// A CUDA device by ordinal; needs a build with the `cuda` feature.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device; a CUDA device in a build without the `cuda` feature is an error.
    pub fn open(self) -> Result<Device, WorkerError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                let failed = |error: candle_core::Error| WorkerError::Device {
                    spec: self.to_string(),
                    reason: error.to_string(),
                };
                let device = Device::new_cuda(ordinal).map_err(failed)?;
                deepmad_kernels::prepare_device(&device).map_err(failed)?;
                Ok(device)
            }
        }
    }

    /// Returns true when this build has candle's CUDA backend.
    pub fn cuda_compiled() -> bool {
        deepmad_kernels::cuda_compiled()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(formatter, "cpu"),
            DeviceSpec::Cuda(ordinal) => write!(formatter, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = WorkerError;

    fn from_str(text: &str) -> Result<DeviceSpec, WorkerError> {
        let invalid = || WorkerError::Device {
            spec: text.to_string(),
            reason: "expected cpu, cuda or cuda:N".into(),
        };
        match text.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => {
                let ordinal = other.strip_prefix("cuda:").ok_or_else(invalid)?;
                ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| invalid())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_people_type() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn cpu_always_opens() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
    }
}
